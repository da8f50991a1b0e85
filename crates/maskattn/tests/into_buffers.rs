//! `forward_into` and `backward_into` write every value of the caller's buffers: filled with
//! NaN beforehand, they end bit-identical to what `forward` and `backward` return, on the
//! tiled and the decode path, with rows that see nothing and keys nobody sees.

mod common;

use common::random_case;
use maskattn::{GradsMut, Mask, View};

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn every_value_of_the_callers_buffers_is_written() {
    let shapes: &[[usize; 6]] = &[
        [2, 4, 2, 113, 90, 59], // tiled
        [2, 6, 3, 3, 200, 16],  // decode (few queries)
    ];
    for (n, &dims) in shapes.iter().enumerate() {
        for seed in 0..4u64 {
            let mut c = random_case(300 + 10 * n as u64 + seed, dims, (64, 64), seed % 2 == 1);
            let [b, _, _, lq, lk, _] = dims;
            // Batch row 1 sees no key past lk/3 and its last query sees nothing at all.
            c.mask = Mask::key_padding(vec![lk, lk / 3])
                & Mask::query_padding(vec![lq, lq - 1])
                & c.mask.clone();
            assert_eq!(b, 2);
            let [out, lse, dq, dk, dv] = c.run_kernel();

            let block = c.block();
            let (q, k, v) = c.views();
            let p = c.params();
            let (mut out2, mut lse2) = (vec![f32::NAN; out.len()], vec![f32::NAN; lse.len()]);
            maskattn::forward_into(&q, &k, &v, &block, &p, &mut out2, &mut lse2).unwrap();
            assert_eq!(bits(&out2), bits(&out), "out, {dims:?} seed {seed}");
            assert_eq!(bits(&lse2), bits(&lse), "lse, {dims:?} seed {seed}");

            let ov = View::bhld("out", &out2, c.q_shape()).unwrap();
            let (mut dq2, mut dk2, mut dv2) = (
                vec![f32::NAN; dq.len()],
                vec![f32::NAN; dk.len()],
                vec![f32::NAN; dv.len()],
            );
            let grads = GradsMut::new(&mut dq2, &mut dk2, &mut dv2);
            maskattn::backward_into(
                &maskattn::Qkv::new(&q, &k, &v),
                &ov,
                &lse2,
                &c.dout_view(),
                &block,
                &p,
                grads,
            )
            .unwrap();
            assert_eq!(bits(&dq2), bits(&dq), "dq, {dims:?} seed {seed}");
            assert_eq!(bits(&dk2), bits(&dk), "dk, {dims:?} seed {seed}");
            assert_eq!(bits(&dv2), bits(&dv), "dv, {dims:?} seed {seed}");
            assert!(dk.iter().all(|x| x.is_finite()));
        }
    }
}
