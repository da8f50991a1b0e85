//! `maskattn attend` with score modifiers in the input file (`bias`, `alibi_slopes`, `sinks`,
//! `rel_bias`) and on the command line (`--softcap`, `--rel-*`): outputs and every gradient
//! against the f64 reference, and clear errors for inputs that do not fit.

use std::path::Path;
use std::process::Command;

use maskattn::{reference, Bias, Mask, Params, RelBias, View};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32
                * 2.0
                - 1.0
        })
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One tensor of an input file: name, dtype, shape, bytes.
type Entry = (&'static str, Dtype, Vec<usize>, Vec<u8>);

fn write(path: &Path, tensors: &[Entry]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, dt, s, b)| (*n, TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn read_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap_or_else(|_| panic!("no `{name}` in the output"))
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn assert_close(what: &str, got: &[f32], golden: &[f64], naive: &[f32]) {
    let a = reference::accuracy(got, golden, naive, reference::EPS_F32);
    assert!(a.ok, "{what}: {a:?}");
}

fn attend(input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_maskattn"))
        .args([
            "attend",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap()
}

const B: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const LQ: usize = 29;
const LK: usize = 37;
const D: usize = 16;
const N: usize = 10;

struct Input {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    bias: Vec<f32>,
    alibi: Vec<f32>,
    sinks: Vec<f32>,
    rel: Vec<f32>,
}

/// The bias broadcast over the batch: `[1, H_q, L_q, L_k]`.
const BIAS_DIMS: [usize; 4] = [1, HQ, LQ, LK];

impl Input {
    fn new() -> Self {
        Input {
            q: values(B * HQ * LQ * D, 1),
            k: values(B * HKV * LK * D, 2),
            v: values(B * HKV * LK * D, 3),
            dout: values(B * HQ * LQ * D, 4),
            bias: values(HQ * LQ * LK, 5),
            alibi: maskattn::alibi_slopes(HQ),
            sinks: values(HQ, 6).iter().map(|x| 2.0 * x).collect(),
            rel: values(N * HQ, 7),
        }
    }

    fn tensors(&self, dout: bool) -> Vec<Entry> {
        let mut t = vec![
            ("q", Dtype::F32, vec![B, HQ, LQ, D], bytes(&self.q)),
            ("k", Dtype::F32, vec![B, HKV, LK, D], bytes(&self.k)),
            ("v", Dtype::F32, vec![B, HKV, LK, D], bytes(&self.v)),
            ("bias", Dtype::F32, BIAS_DIMS.to_vec(), bytes(&self.bias)),
            ("alibi_slopes", Dtype::F32, vec![HQ], bytes(&self.alibi)),
            ("sinks", Dtype::F32, vec![HQ], bytes(&self.sinks)),
            ("rel_bias", Dtype::F32, vec![N, HQ], bytes(&self.rel)),
        ];
        if dout {
            t.push(("dout", Dtype::F32, vec![B, HQ, LQ, D], bytes(&self.dout)));
        }
        t
    }
}

#[test]
fn every_modifier_and_its_gradient_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let x = Input::new();
    let input = dir.path().join("in.safetensors");
    write(&input, &x.tensors(true));
    let output = dir.path().join("out.safetensors");
    let flags = [
        "--mask",
        "causal & key-padding",
        "--softcap",
        "2.5",
        "--rel-buckets",
        "10",
        "--rel-max-distance",
        "20",
        "--rel-bidirectional",
    ];
    let key_lengths: Vec<i64> = vec![37, 20];
    let mut t = x.tensors(true);
    t.push((
        "key_lengths",
        Dtype::I64,
        vec![B],
        key_lengths.iter().flat_map(|x| x.to_le_bytes()).collect(),
    ));
    write(&input, &t);
    let run = attend(&input, &output, &flags);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let file = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&file).unwrap();
    for (name, shape) in [
        ("dbias", BIAS_DIMS.to_vec()),
        ("dalibi_slopes", vec![HQ]),
        ("dsinks", vec![HQ]),
        ("drel_bias", vec![N, HQ]),
    ] {
        assert_eq!(st.tensor(name).unwrap().shape(), &shape[..], "{name}");
    }

    let mask = Mask::causal() & Mask::key_padding(vec![37, 20]);
    let (qv, kv, vv, dv) = (
        View::bhld("q", &x.q, [B, HQ, LQ, D]).unwrap(),
        View::bhld("k", &x.k, [B, HKV, LK, D]).unwrap(),
        View::bhld("v", &x.v, [B, HKV, LK, D]).unwrap(),
        View::bhld("dout", &x.dout, [B, HQ, LQ, D]).unwrap(),
    );
    let p = Params::default()
        .with_softcap(2.5)
        .with_bias(Bias::new(&x.bias, BIAS_DIMS).unwrap())
        .with_alibi(&x.alibi)
        .with_sinks(&x.sinks)
        .with_rel(RelBias::new(&x.rel, N, 20, true).unwrap());
    let g = reference::forward::<f64>(&qv, &kv, &vv, &mask, &p).unwrap();
    let n = reference::forward::<f32>(&qv, &kv, &vv, &mask, &p).unwrap();
    assert_close("out", &read_f32(&st, "out"), &g.out, &n.out);
    assert_close(
        "lse (with the sinks)",
        &read_f32(&st, "lse"),
        &g.lse,
        &n.lse,
    );
    let gg = reference::backward::<f64>(&qv, &kv, &vv, &mask, &p, &dv).unwrap();
    let ng = reference::backward::<f32>(&qv, &kv, &vv, &mask, &p, &dv).unwrap();
    assert_close("dq", &read_f32(&st, "dq"), &gg.dq, &ng.dq);
    assert_close("dk", &read_f32(&st, "dk"), &gg.dk, &ng.dk);
    assert_close("dv", &read_f32(&st, "dv"), &gg.dv, &ng.dv);
    let (gp, np) = (&gg.params, &ng.params);
    for (name, golden, naive) in [
        ("dbias", &gp.dbias, &np.dbias),
        ("dalibi_slopes", &gp.dalibi, &np.dalibi),
        ("dsinks", &gp.dsinks, &np.dsinks),
        ("drel_bias", &gp.drel, &np.drel),
    ] {
        let got = read_f32(&st, name);
        assert!(got.iter().any(|&x| x != 0.0), "{name} is all zero");
        assert_close(
            name,
            &got,
            golden.as_ref().unwrap(),
            naive.as_ref().unwrap(),
        );
    }
    eprintln!("attend with every modifier: out, lse and 7 gradients match the f64 reference");

    // Without dout: the forward only.
    write(&input, &x.tensors(false));
    let run = attend(&input, &output, &flags[2..]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let file = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&file).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, vec!["lse", "out"]);
}

#[test]
fn modifier_inputs_that_do_not_fit_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let x = Input::new();
    let out = dir.path().join("o.safetensors");
    let rel = ["--rel-buckets", "10", "--rel-max-distance", "20"];
    let replace = |name: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>| {
        let mut t = x.tensors(true);
        for e in t.iter_mut().filter(|e| e.0 == name) {
            *e = (e.0, dtype, shape.clone(), data.clone());
        }
        t
    };
    let without = |name: &str| {
        let mut t = x.tensors(true);
        t.retain(|e| e.0 != name);
        t
    };
    let cases: Vec<(Vec<Entry>, Vec<&str>, &str)> = vec![
        (x.tensors(true), vec![], "--rel-buckets"),
        (without("rel_bias"), rel.to_vec(), "needs `rel_bias`"),
        (
            x.tensors(true),
            vec!["--rel-buckets", "8", "--rel-max-distance", "20"],
            "rel_bias has shape [10, 4], expected [--rel-buckets, H_q] = [8, 4]",
        ),
        (
            replace("sinks", Dtype::F32, vec![3], bytes(&[0.0; 3])),
            rel.to_vec(),
            "sinks has shape [3], expected [H_q] = [4]",
        ),
        (
            replace("alibi_slopes", Dtype::F64, vec![HQ], vec![0; 8 * HQ]),
            rel.to_vec(),
            "tensor `alibi_slopes` is F64, expected F32",
        ),
        (
            replace(
                "bias",
                Dtype::F32,
                vec![1, 3, LQ, LK],
                bytes(&vec![0.0; 3 * LQ * LK]),
            ),
            rel.to_vec(),
            "bias",
        ),
        (
            replace("bias", Dtype::F32, vec![HQ, LQ, LK], bytes(&x.bias)),
            rel.to_vec(),
            "tensor `bias` has shape",
        ),
        (
            x.tensors(true),
            [&rel[..], &["--softcap", "0"]].concat(),
            "oft",
        ),
    ];
    for (i, (tensors, flags, want)) in cases.into_iter().enumerate() {
        let input = dir.path().join(format!("in{i}.safetensors"));
        write(&input, &tensors);
        let run = attend(&input, &out, &flags);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "case {i}: should fail");
        assert!(err.contains(want), "case {i}: expected `{want}` in: {err}");
        assert!(!err.contains("panicked"), "case {i}: {err}");
    }
    // --rel-max-distance without --rel-buckets: clap refuses it.
    let input = dir.path().join("in0.safetensors");
    let run = attend(&input, &out, &["--rel-max-distance", "3"]);
    assert!(!run.status.success());
    assert!(!out.exists(), "no output may be written on error");
}
