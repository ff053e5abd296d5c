//! Bounded admission in front of the executor: at most `concurrency` jobs run, `queue` more wait,
//! and anything beyond is refused at once with `RESOURCE_EXHAUSTED`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;
use tonic::Status;

/// Bounded admission: at most `capacity` jobs admitted (running or waiting), `slots` running.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) capacity: usize,
    pub(crate) admitted: AtomicUsize,
}

/// Holds one admitted place; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<Admission>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Ticket, Status> {
        let before = self.admitted.fetch_add(1, Ordering::AcqRel);
        if before >= self.capacity {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(Status::resource_exhausted(format!(
                "the server is at capacity ({} jobs running or queued); retry later",
                self.capacity
            )));
        }
        Ok(Ticket(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admission_is_bounded() {
        let a = Arc::new(Admission {
            slots: Arc::new(Semaphore::new(1)),
            capacity: 2,
            admitted: AtomicUsize::new(0),
        });
        let (t1, t2) = (a.admit().unwrap(), a.admit().unwrap());
        assert_eq!(
            a.admit().unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        drop(t1);
        let _t3 = a.admit().unwrap();
        drop(t2);
    }
}
