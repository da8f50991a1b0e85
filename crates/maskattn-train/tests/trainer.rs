//! The library's loop from the outside: the stop flag and the stop hook end a run with a
//! checkpoint that resumes; a divergence is a typed error that names the checkpoint kept.

use maskattn_candle::model::{LmConfig, Positions};
use maskattn_train::{Diverged, Hooks, Outcome, RunSettings, State, Trainer, Vocab};

fn tiny() -> LmConfig {
    LmConfig {
        vocab: Vocab::Bytes.size(),
        d_model: 16,
        layers: 1,
        heads: 2,
        kv_heads: 2,
        d_ff: 32,
        max_len: 40,
        positions: Positions::Rotary,
        dropout: 0.0,
        softcap: None,
        sinks: false,
    }
}

fn settings(steps: u64, lr: f64) -> RunSettings {
    RunSettings {
        steps,
        batch: 2,
        seq_len: 40,
        eval_every: 1,
        warmup: 1,
        lr,
        ..RunSettings::default()
    }
}

struct StopAt(u64);

impl Hooks for StopAt {
    fn stop(&mut self, state: &State) -> bool {
        state.step == self.0
    }
}

#[test]
fn stopping_saves_a_checkpoint_that_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny(), settings(4, 3e-3), None, dir.path()).unwrap();
    let r = t.run(&mut StopAt(2)).unwrap();
    assert_eq!((r.outcome, r.steps), (Outcome::Stopped, 2));
    let mut t = Trainer::resume(dir.path(), None).unwrap();
    assert_eq!(t.state().step, 2);
    t.stop_flag()
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = t.run(&mut ()).unwrap();
    assert_eq!((r.outcome, r.steps), (Outcome::Interrupted, 0));
    let mut t = Trainer::resume(dir.path(), None).unwrap();
    let r = t.run(&mut ()).unwrap();
    assert_eq!((r.outcome, r.steps), (Outcome::Finished, 2));
    assert_eq!(maskattn_train::open(dir.path()).unwrap().2.step, 4);
}

#[test]
fn divergence_is_a_typed_error_and_the_good_checkpoint_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny(), settings(40, 1e4), None, dir.path()).unwrap();
    let e = t.run(&mut ()).unwrap_err();
    let d = e.downcast_ref::<Diverged>().expect("a Diverged error");
    let kept = d.saved.expect("a checkpoint before the divergence");
    assert!(d.step > kept, "{d}");
    let (_, _, state) = maskattn_train::open(dir.path()).unwrap();
    assert_eq!(state.step, kept);
    assert!(state.evals.iter().all(|e| e.loss.is_finite()));
}
