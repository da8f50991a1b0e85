//! The crate's tasks (`items`, `series`) learn beyond their baselines in short runs, a
//! resumed task run is the uninterrupted one bit for bit, and the series task's variate
//! bias receives a gradient through the attention op and moves.

use maskattn_train::task::items::{Items, ItemsSettings};
use maskattn_train::task::series::{Series, SeriesSettings};
use maskattn_train::task::{Task, TaskTrainer};
use maskattn_train::Outcome;

mod common;
use common::{run, weights, StopAt, TRUNK};

fn small_items() -> Items {
    let s = ItemsSettings {
        items: 120,
        genres: 8,
        history: 16,
        held_out: 128,
    };
    Items::new(s, 3).unwrap()
}

fn small_series() -> Series {
    let s = SeriesSettings {
        row_len: 64,
        patch: 8,
        min_patches: 3,
        max_patches: 6,
        max_variates: 3,
        held_out: 64,
        ..SeriesSettings::default()
    };
    Series::new(s, 5).unwrap()
}

#[test]
fn items_learns_beyond_popularity() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TaskTrainer::new(small_items(), TRUNK, run(150, 16), dir.path()).unwrap();
    let (pop_hit, _) = t.task().popularity();
    let r = t.run(&mut ()).unwrap();
    assert_eq!(r.outcome, Outcome::Finished);
    let e = t.state().evals.last().unwrap();
    assert_eq!(e.metric_name, "hit@10");
    assert!(
        e.metric >= 2.0 * pop_hit,
        "hit@10 {} against popularity {pop_hit}",
        e.metric
    );
    let first = &t.state().evals[0];
    assert!(e.loss < first.loss - 0.3, "{} → {}", first.loss, e.loss);
}

#[test]
fn series_learns_beyond_the_naive_forecasts() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TaskTrainer::new(small_series(), TRUNK, run(200, 8), dir.path()).unwrap();
    let (last, seasonal) = t.task().naive_mse();
    t.run(&mut ()).unwrap();
    let e = t.state().evals.last().unwrap();
    assert_eq!(e.metric_name, "MSE");
    assert!(
        e.metric < last.min(seasonal),
        "MSE {} against last value {last}, seasonal naive {seasonal}",
        e.metric
    );
}

#[test]
fn a_resumed_task_run_is_the_uninterrupted_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut whole = TaskTrainer::new(small_series(), TRUNK, run(8, 4), a.path()).unwrap();
    whole.run(&mut ()).unwrap();

    let mut part = TaskTrainer::new(small_series(), TRUNK, run(8, 4), b.path()).unwrap();
    assert_eq!(part.run(&mut StopAt(3)).unwrap().outcome, Outcome::Stopped);
    drop(part);
    let mut rest = TaskTrainer::<Series>::resume(b.path(), None).unwrap();
    assert_eq!(rest.state().step, 3);
    rest.run(&mut ()).unwrap();
    assert_eq!(rest.state().losses, whole.state().losses);
    assert_eq!(weights(&rest), weights(&whole));
    // Resuming as another task, or as a language model, is refused by name.
    let e = TaskTrainer::<Items>::resume(b.path(), None).err().unwrap();
    assert!(e.to_string().contains("`series` task"), "{e}");
    let e = maskattn_train::Trainer::resume(b.path(), None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("`series` task"), "{e}");
}

#[test]
fn the_variate_bias_receives_a_gradient_and_moves() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TaskTrainer::new(small_series(), TRUNK, run(5, 4), dir.path()).unwrap();
    let bias = t.layers().variate_bias.clone();
    let before: Vec<f32> = bias.flatten_all().unwrap().to_vec1().unwrap();
    // The gradient of the loss with respect to the bias, through the attention op.
    let batch = t.task().train_batch(0, 0, 4).unwrap();
    let hidden = t.hidden(&batch).unwrap();
    let loss = t.task().loss(t.layers(), &hidden, &batch).unwrap();
    let grads = loss.backward().unwrap();
    let g: Vec<f32> = grads
        .get(&bias)
        .expect("the variate bias has a gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(g.iter().all(|x| x.is_finite()));
    assert!(
        g.iter().filter(|x| x.abs() > 1e-6).count() == g.len(),
        "every entry's gradient is non-zero: {g:?}"
    );
    t.run(&mut ()).unwrap();
    let after: Vec<f32> = t
        .layers()
        .variate_bias
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // Every entry changed, and the bias as a whole moved by more than rounding.
    let moved = before.iter().zip(&after).map(|(x, y)| (x - y).abs());
    assert!(
        before.iter().zip(&after).all(|(x, y)| x != y) && moved.fold(0f32, f32::max) > 1e-3,
        "the bias did not move: {before:?} → {after:?}"
    );
}
