//! The vision task: a short run learns beyond chance, a resumed run is the uninterrupted
//! one bit for bit, Swin's layers really alternate between the plain and the shifted
//! windows (checked against Swin's own construction, written out here), and bad windows
//! are refused naming the flag.

use maskattn::{BlockMask, Mask, MaskShape};
use maskattn_train::task::vision::{Vision, VisionMask, VisionSettings};
use maskattn_train::task::{Task, TaskTrainer, Trunk};
use maskattn_train::Outcome;

mod common;
use common::{run, weights, StopAt, TRUNK};

/// 24 × 24 images in 2 × 2 patches: a 12 × 12 grid.
fn small(mask: VisionMask) -> Vision {
    let s = VisionSettings {
        image: 24,
        patch: 2,
        held_out: 128,
        mask,
        ..VisionSettings::default()
    };
    // The run's seed (RunSettings' default), from which a resumed run makes its task again.
    Vision::new(s, 0).unwrap()
}

const SWIN: VisionMask = VisionMask::Swin { window: 4 };

#[test]
fn a_short_vision_run_learns_beyond_chance() {
    // 48 × 48 images in 4 × 4 patches (a 12 × 12 grid), NATTEN 5 × 5: 120 steps of 8
    // images reached 44–56% held-out accuracy for seeds 0–2 (chance: 12.5%).
    let s = VisionSettings {
        image: 48,
        patch: 4,
        held_out: 128,
        mask: VisionMask::Natten {
            kernel: 5,
            dilation: 1,
        },
        ..VisionSettings::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut t =
        TaskTrainer::new(Vision::new(s, 0).unwrap(), TRUNK, run(120, 8), dir.path()).unwrap();
    let before = t.evaluate().unwrap();
    t.run(&mut ()).unwrap();
    let after = t.evaluate().unwrap();
    assert!(
        after.metric >= 0.3 && after.loss < before.loss - 0.2,
        "before: {:.3} ({:.1}%), after: {:.3} ({:.1}%)",
        before.loss,
        100.0 * before.metric,
        after.loss,
        100.0 * after.metric
    );
}

#[test]
fn a_resumed_vision_run_is_the_uninterrupted_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut whole = TaskTrainer::new(small(SWIN), TRUNK, run(8, 4), a.path()).unwrap();
    whole.run(&mut ()).unwrap();

    let mut part = TaskTrainer::new(small(SWIN), TRUNK, run(8, 4), b.path()).unwrap();
    assert_eq!(part.run(&mut StopAt(3)).unwrap().outcome, Outcome::Stopped);
    drop(part);
    let mut rest = TaskTrainer::<Vision>::resume(b.path(), None).unwrap();
    assert_eq!(rest.state().step, 3);
    assert_eq!(rest.task().settings().mask, SWIN);
    rest.run(&mut ()).unwrap();
    assert_eq!(rest.state().losses, whole.state().losses);
    assert_eq!(weights(&rest), weights(&whole));
    // The same weights give the same held-out figures.
    assert_eq!(rest.state().evals.last(), whole.state().evals.last());
}

/// Swin's attention mask as its code builds it (`SwinTransformerBlock`): roll the grid by
/// `(−s, −s)`, label the rolled grid's regions by the slices `[0, n−w)`, `[n−w, n−s)`,
/// `[n−s, n)` of each axis (`img_mask`; one region when `s = 0`), cut it into `w × w`
/// windows; two patches attend when they share a window and a region.
fn swin_reference(n: usize, w: usize, s: usize, q: usize, k: usize) -> bool {
    let rolled = |p: usize| {
        let (y, x) = (p / n, p % n);
        ((y + n - s) % n, (x + n - s) % n)
    };
    let slice = |r: usize| {
        // Unshifted, Swin builds no `img_mask`: one region.
        if s == 0 || r < n - w {
            0
        } else if r < n - s {
            1
        } else {
            2
        }
    };
    let ((qy, qx), (ky, kx)) = (rolled(q), rolled(k));
    let same_window = qy / w == ky / w && qx / w == kx / w;
    let same_region = (slice(qy), slice(qx)) == (slice(ky), slice(kx));
    same_window && same_region
}

#[test]
fn swin_layers_alternate_between_plain_and_shifted_windows() {
    // The default image: a 24 × 24 grid (576 patches, 9 × 9 tiles of 64).
    let w = 6;
    let s = VisionSettings {
        held_out: 4,
        mask: VisionMask::Swin { window: w },
        ..VisionSettings::default()
    };
    let task = Vision::new(s, 1).unwrap();
    let (n, l) = (24, 576);
    let dir = tempfile::tempdir().unwrap();
    let trunk = Trunk { layers: 4, ..TRUNK };
    let t = TaskTrainer::new(task, trunk, run(1, 2), dir.path()).unwrap();
    let batch = t.task().held_out_image(0);
    let input = t.task().input(t.layers(), &batch, &trunk).unwrap();
    let masks = input.masks(trunk.layers);
    let compiled = t.encoder().compile_layers(&masks, 1, l).unwrap();
    let shape = MaskShape::new(1, trunk.heads, l, l);
    let plain = BlockMask::new(&Mask::swin(n, n, w, 0), shape).unwrap();
    let shifted = BlockMask::new(&Mask::swin(n, n, w, w / 2), shape).unwrap();
    let classes = |m: &BlockMask| {
        let (qt, kt) = m.grid();
        let mut v = Vec::new();
        for i in 0..qt {
            for j in 0..kt {
                v.push(format!("{:?}", m.class(0, 0, i, j)));
            }
        }
        v
    };
    assert_ne!(classes(&plain), classes(&shifted));
    for (i, c) in compiled.iter().enumerate() {
        let want = if i % 2 == 0 { &plain } else { &shifted };
        assert_eq!(classes(c), classes(want), "layer {i}");
        assert_eq!(c.stats(), want.stats(), "layer {i}");
    }
    // Equal masks share one compilation.
    assert!(std::sync::Arc::ptr_eq(&compiled[0], &compiled[2]));

    // What the layers attend to, against Swin's own construction: each layer's weights
    // are non-zero exactly on the pairs its windows allow, and each row sums to 1.
    for layer in [0, 1] {
        let p = t.attention_weights(&batch, layer).unwrap();
        let p: Vec<Vec<f32>> = p.get(0).unwrap().get(0).unwrap().to_vec2().unwrap();
        for (q, row) in p.iter().enumerate() {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "layer {layer}, row {q}: {sum}");
            for (k, &x) in row.iter().enumerate() {
                let seen = swin_reference(n, w, if layer == 0 { 0 } else { w / 2 }, q, k);
                assert_eq!(x > 0.0, seen, "layer {layer}, query {q}, key {k}");
            }
        }
    }
}

#[test]
fn bad_windows_are_refused_naming_the_flag() {
    let make = |mask| {
        let s = VisionSettings {
            held_out: 4,
            mask,
            ..VisionSettings::default()
        };
        Vision::new(s, 0).err().map(|e| e.to_string())
    };
    let even = make(VisionMask::Natten {
        kernel: 4,
        dilation: 1,
    });
    assert!(
        even.as_deref().unwrap_or("").contains("--window 4"),
        "{even:?}"
    );
    let wide = make(VisionMask::Natten {
        kernel: 7,
        dilation: 4,
    });
    assert!(
        wide.as_deref().unwrap_or("").contains("--dilation 4"),
        "{wide:?}"
    );
    let uneven = make(VisionMask::Swin { window: 5 });
    assert!(
        uneven.as_deref().unwrap_or("").contains("--window 5"),
        "{uneven:?}"
    );
    assert!(make(VisionMask::Swin { window: 8 }).is_none());
    assert!(make(VisionMask::Natten {
        kernel: 7,
        dilation: 3
    })
    .is_none());
}
