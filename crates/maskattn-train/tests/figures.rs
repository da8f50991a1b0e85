//! The pictures the tasks ask for after a run ([`Task::figures`]) hold what they say: the
//! items task's hit@k curve agrees with its evaluation and its popularity baseline at
//! k = 10 and never falls; the series task's panels are held-out variates with a context
//! before the forecast and three continuations after it. And [`Forecaster`] refuses a
//! checkpoint of another task by name and forecasts a trained model's series.

use maskattn_train::task::items::{Items, ItemsSettings};
use maskattn_train::task::series::{Series, SeriesSettings};
use maskattn_train::task::series_csv::Table;
use maskattn_train::task::series_forecast::Forecaster;
use maskattn_train::task::{Role, Task, TaskTrainer, Trunk};
use maskattn_train::RunSettings;

const TRUNK: Trunk = Trunk {
    d_model: 16,
    layers: 1,
    heads: 2,
    d_ff: 32,
};

fn run(steps: u64) -> RunSettings {
    RunSettings {
        steps,
        batch: 4,
        warmup: 2,
        eval_every: steps,
        ..RunSettings::default()
    }
}

#[test]
fn items_hits_agree_with_the_evaluation() {
    let s = ItemsSettings {
        items: 60,
        genres: 6,
        history: 12,
        held_out: 100,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut t = TaskTrainer::new(Items::new(s, 1).unwrap(), TRUNK, run(20), dir.path()).unwrap();
    t.run(&mut ()).unwrap();
    let figs = t.figures().unwrap();
    assert_eq!(figs.len(), 1);
    assert_eq!(figs[0].name, "hits");
    let lines = &figs[0].panels[0].lines;
    let at = |role: Role, k: usize| {
        let l = lines.iter().find(|l| l.role == role).unwrap();
        assert_eq!(l.points.len(), 50);
        assert!(l.points.windows(2).all(|w| w[1].1 >= w[0].1), "{l:?}");
        l.points[k - 1]
    };
    assert_eq!(at(Role::Model, 10), (10.0, t.evaluate().unwrap().metric));
    assert_eq!(at(Role::Baseline, 10), (10.0, t.task().popularity().0));
    // 60 items: at k = 50 most targets are among the k best of either ranking.
    assert!(at(Role::Baseline, 50).1 > at(Role::Baseline, 10).1);
}

#[test]
fn series_panels_and_the_forecaster() {
    let s = SeriesSettings {
        row_len: 64,
        min_patches: 3,
        max_patches: 6,
        max_variates: 3,
        held_out: 16,
        ..SeriesSettings::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let task = Series::new(s.clone(), 2).unwrap();
    let mut t = TaskTrainer::new(task, TRUNK, run(4), dir.path()).unwrap();
    t.run(&mut ()).unwrap();
    let figs = t.figures().unwrap();
    assert_eq!(figs[0].name, "forecast");
    assert_eq!(figs[0].panels.len(), 6);
    for panel in &figs[0].panels {
        let roles: Vec<Role> = panel.lines.iter().map(|l| l.role).collect();
        assert_eq!(
            roles,
            [Role::History, Role::Truth, Role::Model, Role::Baseline]
        );
        let ctx = &panel.lines[0].points;
        assert!(ctx.len() >= 24 && ctx.len() % 8 == 0, "{}", ctx.len());
        assert_eq!(ctx.last().unwrap().0, -1.0);
        for l in &panel.lines[1..] {
            let xs: Vec<f64> = l.points.iter().map(|p| p.0).collect();
            assert_eq!(xs, (-1..8).map(f64::from).collect::<Vec<_>>());
            assert_eq!(l.points[0], *ctx.last().unwrap());
            assert!(l.points.iter().all(|p| p.1.is_finite()));
        }
    }

    // The checkpoint serves forecasts; one of another task is refused by name.
    let f = Forecaster::open(dir.path()).unwrap();
    assert_eq!((f.step(), f.shortest(), f.context_len(100)), (4, 24, 48));
    let csv = dir.path().join("s.csv");
    let rows: String = (0..40)
        .map(|t| format!("{t},{}\n", (t as f64).sin()))
        .collect();
    std::fs::write(&csv, format!("x,y\n{rows}")).unwrap();
    let table = Table::read_all(&csv).unwrap();
    let fc = f.forecast(&table, 16).unwrap();
    assert!(fc
        .iter()
        .all(|c| c.len() == 16 && c.iter().all(|v| v.is_finite())));
    let fig = f.figure(&table, &fc);
    assert_eq!(fig.panels.len(), 2);
    assert_eq!(fig.panels[0].lines[1].points.last().unwrap().0, 55.0);

    let other = tempfile::tempdir().unwrap();
    let items = ItemsSettings {
        items: 40,
        genres: 4,
        history: 8,
        held_out: 8,
    };
    let mut t =
        TaskTrainer::new(Items::new(items, 1).unwrap(), TRUNK, run(1), other.path()).unwrap();
    t.run(&mut ()).unwrap();
    let e = Forecaster::open(other.path()).err().unwrap().to_string();
    assert!(e.contains("--checkpoint") && e.contains("`items`"), "{e}");
}
