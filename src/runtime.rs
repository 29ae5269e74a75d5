//! What every background part of a node shares: its metrics, its task tracker and its stop signal.

use std::sync::Arc;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::metrics::Metrics;

/// A cheap handle given to every part of a node that runs tasks: they register with `tasks`,
/// stop when `cancel` fires, and count into `metrics`. The node waits for `tasks` on shutdown.
#[derive(Clone)]
pub struct Runtime {
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// Every background task of the node, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Fires when the node stops.
    pub cancel: CancellationToken,
}

impl Runtime {
    /// A runtime for the node `node`.
    pub fn new(node: &str) -> Self {
        Self {
            metrics: Arc::new(Metrics::new(node)),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Spawns a background task the node waits for on shutdown.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }
}
