//! The speech task learns to classify frames well beyond the majority class in a short run,
//! a resumed run is the uninterrupted one bit for bit, and bad settings are refused.

use maskattn_train::task::speech::{Speech, SpeechSettings};
use maskattn_train::task::{Task, TaskTrainer};
use maskattn_train::{Outcome, RunSettings};

mod common;
use common::{run, weights, StopAt, TRUNK};

fn small() -> Speech {
    let s = SpeechSettings {
        row_len: 64,
        chunk: 8,
        left: Some(2),
        held_out: 16,
    };
    // The run's seed (RunSettings' default): a resumed run rebuilds the task from it.
    Speech::new(s, RunSettings::default().seed).unwrap()
}

#[test]
fn speech_learns_beyond_the_majority_class() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TaskTrainer::new(small(), TRUNK, run(120, 8), dir.path()).unwrap();
    let majority = t.task().majority();
    assert!(
        majority < 0.4,
        "the classes are balanced enough: {majority}"
    );
    let r = t.run(&mut ()).unwrap();
    assert_eq!(r.outcome, Outcome::Finished);
    let e = t.state().evals.last().unwrap();
    assert_eq!(e.metric_name, "accuracy");
    assert!(
        e.metric >= 2.0 * majority && e.metric > 0.6,
        "accuracy {} against majority {majority}",
        e.metric
    );
    let first = &t.state().evals[0];
    assert!(e.loss < first.loss - 0.5, "{} → {}", first.loss, e.loss);
}

#[test]
fn a_resumed_speech_run_is_the_uninterrupted_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut whole = TaskTrainer::new(small(), TRUNK, run(8, 4), a.path()).unwrap();
    whole.run(&mut ()).unwrap();

    let mut part = TaskTrainer::new(small(), TRUNK, run(8, 4), b.path()).unwrap();
    assert_eq!(part.run(&mut StopAt(3)).unwrap().outcome, Outcome::Stopped);
    drop(part);
    let mut rest = TaskTrainer::<Speech>::resume(b.path(), None).unwrap();
    assert_eq!(rest.state().step, 3);
    assert_eq!(rest.task().settings(), whole.task().settings());
    rest.run(&mut ()).unwrap();
    assert_eq!(rest.state().losses, whole.state().losses);
    assert_eq!(weights(&rest), weights(&whole));
    assert_eq!(rest.state().evals, whole.state().evals);
}

#[test]
fn bad_settings_are_refused_by_name() {
    let s = SpeechSettings {
        chunk: 0,
        ..SpeechSettings::default()
    };
    let e = Speech::new(s, 0).err().unwrap();
    assert!(e.to_string().contains("--chunk 0"), "{e}");
    let s = SpeechSettings {
        held_out: 0,
        ..SpeechSettings::default()
    };
    assert!(Speech::new(s, 0).is_err());
}

#[test]
fn a_batch_is_drawn_from_the_seed_and_step_alone() {
    let t = small();
    let (x, y) = (
        t.train_batch(3, 17, 2).unwrap(),
        t.train_batch(3, 17, 2).unwrap(),
    );
    assert_eq!(
        (&x.feats, &x.labels, &x.start),
        (&y.feats, &y.labels, &y.start)
    );
    let z = t.train_batch(3, 18, 2).unwrap();
    assert_ne!(z.labels, y.labels);
}
