//! A call whose `Cancel` flag is set stops between tiles and says so: forward (tiled and
//! decode paths) and backward, with the tiles it skipped left unwritten.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use maskattn::{AttnError, BlockMask, Cancel, Mask, MaskShape, Params, Qkv, View};

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 1000.0 - 0.5
        })
        .collect()
}

#[test]
fn a_flag_set_before_the_call_skips_every_tile() {
    let s = [1, 2, 256, 32];
    let n: usize = s.iter().product();
    let (qd, kd, vd) = (data(n, 1), data(n, 2), data(n, 3));
    let (q, k, v) = (
        View::bhld("q", &qd, s).unwrap(),
        View::bhld("k", &kd, s).unwrap(),
        View::bhld("v", &vd, s).unwrap(),
    );
    let block = BlockMask::new(&Mask::causal(), MaskShape::new(1, 2, 256, 256)).unwrap();
    let flag = Cancel::new();
    flag.cancel();
    let params = Params::default().with_cancel(&flag);
    let mut out = vec![f32::NAN; n];
    let mut lse = vec![f32::NAN; 2 * 256];
    let e = maskattn::forward_into(&q, &k, &v, &block, &params, &mut out, &mut lse).unwrap_err();
    assert_eq!(e, AttnError::Cancelled);
    // Every query tile was skipped: nothing was written (the tiled path, L_q = 256).
    assert!(out.iter().chain(&lse).all(|x| x.is_nan()));

    // The backward of a finished forward, cancelled: an error, not gradients.
    let fwd = maskattn::forward(&q, &k, &v, &block, &Params::default()).unwrap();
    let o = View::bhld("out", &fwd.out, s).unwrap();
    let dout = View::bhld("dout", &qd, s).unwrap();
    let e = maskattn::backward(&Qkv::new(&q, &k, &v), &o, &fwd.lse, &dout, &block, &params)
        .unwrap_err();
    assert_eq!(e, AttnError::Cancelled);
    assert!(e.to_string().contains("cancelled"), "{e}");

    // The decode path (one query row) says so too.
    let s1 = [1, 2, 1, 32];
    let q1 = View::bhld("q", &qd[..64], s1).unwrap();
    let block1 = BlockMask::new(&Mask::full(), MaskShape::new(1, 2, 1, 256)).unwrap();
    let e = maskattn::forward(&q1, &k, &v, &block1, &params).unwrap_err();
    assert_eq!(e, AttnError::Cancelled);
}

#[test]
fn an_unset_flag_changes_nothing() {
    let s = [1, 2, 192, 32];
    let n: usize = s.iter().product();
    let (qd, kd, vd) = (data(n, 4), data(n, 5), data(n, 6));
    let (q, k, v) = (
        View::bhld("q", &qd, s).unwrap(),
        View::bhld("k", &kd, s).unwrap(),
        View::bhld("v", &vd, s).unwrap(),
    );
    let block = BlockMask::new(&Mask::causal(), MaskShape::new(1, 2, 192, 192)).unwrap();
    let flag = Cancel::new();
    let plain = maskattn::forward(&q, &k, &v, &block, &Params::default()).unwrap();
    let flagged =
        maskattn::forward(&q, &k, &v, &block, &Params::default().with_cancel(&flag)).unwrap();
    assert_eq!(plain.out, flagged.out);
    assert_eq!(plain.lse, flagged.lse);
}

#[test]
fn a_flag_set_from_another_thread_stops_a_running_call() {
    // On one thread, ≈ 140 GFLOP: seconds on any CPU, so the flag, set after 20 ms, lands
    // mid-call; the call must end with `Cancelled` (in milliseconds) and leave tiles unwritten.
    let s = [1, 8, 8192, 64];
    let n: usize = s.iter().product();
    let (qd, kd, vd) = (data(n, 7), data(n, 8), data(n, 9));
    let (q, k, v) = (
        View::bhld("q", &qd, s).unwrap(),
        View::bhld("k", &kd, s).unwrap(),
        View::bhld("v", &vd, s).unwrap(),
    );
    let block = BlockMask::new(&Mask::full(), MaskShape::new(1, 8, 8192, 8192)).unwrap();
    let flag = Arc::new(Cancel::new());
    let setter = {
        let flag = flag.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            flag.cancel();
        })
    };
    let mut out = vec![f32::NAN; n];
    let mut lse = vec![f32::NAN; 8 * 8192];
    let params = Params::default().with_cancel(&flag);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let r = one.install(|| maskattn::forward_into(&q, &k, &v, &block, &params, &mut out, &mut lse));
    setter.join().unwrap();
    assert_eq!(r.unwrap_err(), AttnError::Cancelled);
    let skipped = lse.iter().filter(|x| x.is_nan()).count();
    assert!(
        skipped > 0,
        "every row was computed: the flag was not looked at mid-call"
    );
}
