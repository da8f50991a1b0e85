//! A tensor's CPU buffer, read in place by the kernels (the op and its modifiers' pack).

use candle_core::{CpuStorage, Error, Layout, Result, Storage, Tensor};

/// The CPU buffer of a tensor as a candle storage guard.
pub(crate) fn cpu(t: &Tensor) -> Result<(impl std::ops::Deref<Target = Storage> + '_, &Layout)> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(_) => Ok((s, l)),
        _ => Err(Error::Msg(
            "maskattn: only the CPU device is supported".into(),
        )),
    }
}

/// The CPU storage inside a guard that [`cpu`] returned.
pub(crate) fn as_cpu(s: &Storage) -> &CpuStorage {
    match s {
        Storage::Cpu(c) => c,
        _ => unreachable!("checked by `cpu`"),
    }
}
