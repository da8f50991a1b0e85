//! What a checkpoint of a task run records of the task.

use serde::{Deserialize, Serialize};

use super::encoder::Trunk;

/// What a checkpoint records of a task run: enough to rebuild the task and its model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// [`Task::NAME`](super::Task::NAME).
    pub name: String,
    /// [`Task::settings`](super::Task::settings), as JSON.
    pub settings: serde_json::Value,
    /// The encoder's shape.
    pub trunk: Trunk,
}
