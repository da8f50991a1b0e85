//! `maskattn attend` end to end: a file in, a file out, checked against the f64 reference.

use std::path::Path;
use std::process::Command;

use maskattn::{reference, DenseMask, Mask, View};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_maskattn"))
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32
                * 2.0
                - 1.0
        })
        .collect()
}

fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

fn write(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, dt, s, b)| (*n, TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn read_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The accuracy rule of docs/design.md section 4.
fn assert_close(what: &str, got: &[f32], golden: &[f64], naive: &[f32]) {
    let a = reference::accuracy(got, golden, naive, reference::EPS_F32);
    assert!(a.ok, "{what}: {a:?}");
}

#[test]
fn attend_writes_outputs_and_gradients_that_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (b, hq, hkv, l, d) = (2usize, 4usize, 2usize, 45usize, 24usize);
    let q = values(b * hq * l * d, 1);
    let k = values(b * hkv * l * d, 2);
    let v = values(b * hkv * l * d, 3);
    let dout = values(b * hq * l * d, 4);
    let key_lengths: Vec<i64> = vec![45, 30];
    let doc_ids: Vec<i64> = (0..b * l).map(|x| ((x % l) / 20) as i64).collect();
    // Dense [1, H, L, L]: head 1 hides the first key from everyone.
    let mask_u8: Vec<u8> = (0..hq * l * l)
        .map(|x| !(x / (l * l) == 1 && x % l == 0) as u8)
        .collect();
    let input = dir.path().join("in.safetensors");
    write(
        &input,
        vec![
            ("q", Dtype::F32, vec![b, hq, l, d], le(&q, f32::to_le_bytes)),
            (
                "k",
                Dtype::F32,
                vec![b, hkv, l, d],
                le(&k, f32::to_le_bytes),
            ),
            (
                "v",
                Dtype::F32,
                vec![b, hkv, l, d],
                le(&v, f32::to_le_bytes),
            ),
            (
                "dout",
                Dtype::F32,
                vec![b, hq, l, d],
                le(&dout, f32::to_le_bytes),
            ),
            (
                "key_lengths",
                Dtype::I64,
                vec![b],
                le(&key_lengths, i64::to_le_bytes),
            ),
            (
                "doc_ids",
                Dtype::I64,
                vec![b, l],
                le(&doc_ids, i64::to_le_bytes),
            ),
            ("mask", Dtype::U8, vec![1, hq, l, l], mask_u8.clone()),
        ],
    );
    let output = dir.path().join("out.safetensors");
    let expr = "causal & key-padding&documents & dense & window(12, 0)";
    let run = bin()
        .args([
            "attend",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--mask",
            expr,
            "--scale",
            "0.3",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let bytes = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("lse").unwrap().shape(), &[b, hq, l]);
    assert_eq!(st.tensor("dk").unwrap().shape(), &[b, hkv, l, d]);

    // The same mask built by hand, evaluated by the reference.
    let allowed: Vec<bool> = mask_u8.iter().map(|&x| x != 0).collect();
    let mask = Mask::causal()
        & Mask::key_padding(vec![45, 30])
        & Mask::documents(doc_ids, b)
        & Mask::dense(DenseMask::new(allowed, [1, hq, l, l]).unwrap())
        & Mask::window(12, 0);
    let (qv, kv, vv) = (
        View::bhld("q", &q, [b, hq, l, d]).unwrap(),
        View::bhld("k", &k, [b, hkv, l, d]).unwrap(),
        View::bhld("v", &v, [b, hkv, l, d]).unwrap(),
    );
    let dv = View::bhld("dout", &dout, [b, hq, l, d]).unwrap();
    let s = maskattn::Params::scale(0.3);
    let g = reference::forward::<f64>(&qv, &kv, &vv, &mask, &s).unwrap();
    let n = reference::forward::<f32>(&qv, &kv, &vv, &mask, &s).unwrap();
    assert_close("out", &read_f32(&st, "out"), &g.out, &n.out);
    let lse = read_f32(&st, "lse");
    assert_close("lse", &lse, &g.lse, &n.lse);
    // Head 1 of every batch row: query 0 sees only key 0, which the dense mask hides.
    assert_eq!(lse[l], f32::NEG_INFINITY);
    let gg = reference::backward::<f64>(&qv, &kv, &vv, &mask, &s, &dv).unwrap();
    let ng = reference::backward::<f32>(&qv, &kv, &vv, &mask, &s, &dv).unwrap();
    assert_close("dq", &read_f32(&st, "dq"), &gg.dq, &ng.dq);
    assert_close("dk", &read_f32(&st, "dk"), &gg.dk, &ng.dk);
    assert_close("dv", &read_f32(&st, "dv"), &gg.dv, &ng.dv);
}

#[test]
fn attend_without_dout_writes_only_the_forward() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let x = values(3 * 8, 9);
    write(
        &input,
        vec![
            ("q", Dtype::F32, vec![1, 1, 3, 8], le(&x, f32::to_le_bytes)),
            ("k", Dtype::F32, vec![1, 1, 3, 8], le(&x, f32::to_le_bytes)),
            ("v", Dtype::F32, vec![1, 1, 3, 8], le(&x, f32::to_le_bytes)),
        ],
    );
    let output = dir.path().join("out.safetensors");
    let run = bin()
        .args([
            "attend",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--mask",
            "causal-top-left",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, vec!["lse", "out"]);
    // Query 0 sees only key 0: its output is v_0 exactly (up to rounding of 1.0 · v).
    let out = read_f32(&st, "out");
    for c in 0..8 {
        assert!((out[c] - x[c]).abs() < 1e-6);
    }
}

#[test]
fn attend_reports_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let x = values(2 * 4 * 8, 5);
    let good = dir.path().join("in.safetensors");
    let bad_v = dir.path().join("bad_v.safetensors");
    let bad_dtype = dir.path().join("bad_dtype.safetensors");
    for (path, v_shape, k_dtype) in [
        (&good, vec![1, 2, 4, 8], Dtype::F32),
        (&bad_v, vec![1, 1, 4, 8], Dtype::F32),
        (&bad_dtype, vec![1, 2, 4, 8], Dtype::I32),
    ] {
        let n: usize = v_shape.iter().product();
        write(
            path,
            vec![
                ("q", Dtype::F32, vec![1, 2, 4, 8], le(&x, f32::to_le_bytes)),
                ("k", k_dtype, vec![1, 2, 4, 8], le(&x, f32::to_le_bytes)),
                ("v", Dtype::F32, v_shape, le(&x[..n], f32::to_le_bytes)),
            ],
        );
    }
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a tensor file").unwrap();
    let out = dir.path().join("o.safetensors");
    let cases: Vec<(&Path, &str, &str)> = vec![
        (&bad_v, "full", "must have the same shape"),
        (&bad_dtype, "full", "tensor `k` is I32, expected F32"),
        (&good, "key-padding", "key_lengths"),
        (&good, "documents", "doc_ids"),
        (&good, "dense", "`mask` is missing"),
        (&good, "causal & sideways", "unknown mask term"),
        (&garbage, "full", "not a safetensors file"),
        (Path::new("/nonexistent/x.safetensors"), "full", "reading"),
    ];
    for (input, expr, want) in cases {
        let run = bin()
            .args([
                "attend",
                input.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--mask",
                expr,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{expr}: should fail");
        assert!(err.contains(want), "{expr}: expected `{want}` in: {err}");
        assert!(err.starts_with("error: "), "{expr}: {err}");
        assert!(!err.contains("panicked"), "{expr}: {err}");
    }
    assert!(!out.exists(), "no output may be written on error");
}

/// `maskattn demo` checks every kind of mask against the f64 reference and says so.
#[test]
fn demo_checks_every_mask_kind() {
    let out = bin().arg("demo").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("mask "))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    for kind in [
        "full",
        "causal",
        "window",
        "key-padding",
        "documents",
        "prefix",
        "chunks",
        "block-causal",
        "neighbourhood",
        "dense",
        "fn",
    ] {
        assert!(
            rows.iter().any(|r| r.contains(kind)),
            "no {kind} row in\n{text}"
        );
    }
    assert!(rows.iter().all(|r| r.ends_with("yes")), "{text}");
}

/// A small valid input (`q`, `k`, `v` [1, 1, L, d]; `dout` too when `grads`) in `dir`.
fn small_input(dir: &Path, l: usize, d: usize, grads: bool) -> std::path::PathBuf {
    let input = dir.join("in.safetensors");
    let x = values(l * d, 7);
    let t = |name| (name, Dtype::F32, vec![1, 1, l, d], le(&x, f32::to_le_bytes));
    let mut ts = vec![t("q"), t("k"), t("v")];
    if grads {
        ts.push(t("dout"));
    }
    write(&input, ts);
    input
}

fn attend_to(input: &Path, output: &Path) -> std::process::Output {
    bin()
        .args([
            "attend",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ])
        .output()
        .unwrap()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_attend_output(bytes: &[u8]) {
    let st = SafeTensors::deserialize(bytes).expect("a safetensors file");
    let mut names = st.names();
    names.sort();
    assert_eq!(names, vec!["lse", "out"]);
}

/// `-o DIR` is refused before anything is computed, and leaves no temporary file beside it
/// (it used to leave `DIR.safetensors.tmp`).
#[test]
fn attend_refuses_a_directory_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = small_input(dir.path(), 3, 8, false);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let run = attend_to(&input, &sub);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        err.starts_with("error: ") && err.contains("is a directory"),
        "{err}"
    );
    assert_eq!(names_in(dir.path()), vec!["in.safetensors", "sub"]);
    assert!(names_in(&sub).is_empty());
}

/// A symlink stays a link: the file it names is replaced, in its own folder.
#[test]
fn attend_writes_through_a_symlink_to_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let input = small_input(dir.path(), 3, 8, false);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("real.safetensors"), b"old").unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink("data/real.safetensors", &link).unwrap();
    let run = attend_to(&input, &link);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_attend_output(&std::fs::read(data.join("real.safetensors")).unwrap());
    assert_eq!(names_in(&data), vec!["real.safetensors"]);
    assert_eq!(
        names_in(dir.path()),
        vec!["data", "in.safetensors", "link.safetensors"]
    );
}

/// A FIFO and a character device are written through, not replaced by a regular file.
#[test]
fn attend_writes_through_fifos_and_devices() {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let dir = tempfile::tempdir().unwrap();
    let input = small_input(dir.path(), 3, 8, false);

    // The FIFO is held open for reading and writing without blocking (O_NONBLOCK), so that
    // attend's open returns at once and a FIFO replaced by a file fails the test instead of
    // hanging it. The output (a few hundred bytes) fits in the pipe's buffer.
    let fifo = dir.path().join("fifo.safetensors");
    let mk = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(mk.success());
    const O_NONBLOCK: i32 = 0o4000;
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let run = attend_to(&input, &fifo);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert_attend_output(&got);
    assert_eq!(
        names_in(dir.path()),
        vec!["fifo.safetensors", "in.safetensors"]
    );

    // A private copy of /dev/null (needs root for mknod; skipped otherwise). Only once that
    // passed are the real /dev/null and /dev/stdout used: the old code replaced them.
    let null = dir.path().join("null");
    if Command::new("mknod")
        .args([null.to_str().unwrap(), "c", "1", "3"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        let run = attend_to(&input, &null);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(std::fs::symlink_metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device());
        assert_eq!(
            names_in(dir.path()),
            vec!["fifo.safetensors", "in.safetensors", "null"]
        );
    } else {
        eprintln!("mknod not permitted: the private character device case was skipped");
    }
    let run = attend_to(&input, Path::new("/dev/null"));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    // `-o /dev/stdout` with stdout a pipe: the file arrives on stdout.
    let run = attend_to(&input, Path::new("/dev/stdout"));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_attend_output(&run.stdout);
    // /dev/full: the device's "no space" is the error, one line, exit status 1.
    let run = attend_to(&input, Path::new("/dev/full"));
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("No space left"),
        "{err}"
    );
}

/// A real full disk: a 64 KiB tmpfs in a private mount namespace (`unshare --mount`, as root;
/// the mount ends with the namespace, nothing is left mounted). The output does not fit:
/// the run fails with the file system's error, the old output is untouched and no temporary
/// file is left in the folder.
#[test]
fn attend_on_a_full_disk_keeps_the_old_output_and_leaves_no_temporary() {
    let probe = Command::new("unshare")
        .args(["--mount", "true"])
        .stderr(std::process::Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("unshare --mount not permitted here: the full-disk test was skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // out, lse, dq, dk, dv of [1, 1, 256, 64]: about 320 KiB, five times the disk.
    let input = small_input(dir.path(), 256, 64, true);
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let script = r#"mount -t tmpfs -o size=64k tmpfs "$1" || exit 99
printf old > "$1/out.safetensors"
"$2" attend "$3" -o "$1/out.safetensors"
echo "rc=$?"
ls -A "$1"
echo "content=$(cat "$1/out.safetensors")""#;
    let run = Command::new("unshare")
        .args(["--mount", "sh", "-c", script, "sh"])
        .arg(&disk)
        .arg(env!("CARGO_BIN_EXE_maskattn"))
        .arg(&input)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "mount failed: {out}{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec!["rc=1", "out.safetensors", "content=old"],
        "{err}"
    );
    assert!(
        names_in(&disk).is_empty(),
        "the mount is gone with its namespace"
    );
}
