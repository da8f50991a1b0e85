//! Pictures a task asks for after a run — forecasts against the truth, a ranking's hits —
//! as plain data: line charts of one or more panels. The program draws them (the library
//! draws nothing and depends on no plotting crate).

/// A picture: panels of lines sharing the axes' meaning.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// The file name it is written under, without extension (`forecast`, `hits`).
    pub name: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub panels: Vec<Panel>,
}

/// One chart of a [`Figure`].
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub lines: Vec<Line>,
    /// An x where something begins (the first forecast value), drawn as a vertical rule.
    pub divider: Option<f64>,
}

/// A line of a [`Panel`]; its [`Role`] decides how it is drawn, the same in every panel.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub label: String,
    pub role: Role,
    pub points: Vec<(f64, f64)>,
}

/// What a line is, for its colour and dash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// What the model was given (the context).
    History,
    /// What happened.
    Truth,
    /// The model's answer.
    Model,
    /// A baseline's answer (drawn dashed).
    Baseline,
}
