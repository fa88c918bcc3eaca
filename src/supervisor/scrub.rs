//! The background scrub (`[store] scrub = "1d"`): every so often the job's
//! store is verified and repaired ([`ImageStore::repair`]) on a thread of
//! its own at the lowest CPU and I/O priority, so the job and the
//! checkpoints it competes with keep the machine.

use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::store::ImageStore;

/// Starts the scrub loop for `store`; abort the handle to stop it (a pass
/// in progress finishes on its own thread).
pub(super) fn start(store: ImageStore, every: Duration) -> JoinHandle<()> {
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            loop {
                tokio::time::sleep(every).await;
                let s = store.clone();
                let (tx, rx) = tokio::sync::oneshot::channel();
                let spawned = std::thread::Builder::new()
                    .name("scrub".into())
                    .spawn(move || {
                        lowest_priority();
                        let _ = tx.send(s.repair());
                    });
                if let Err(e) = spawned {
                    warn!(error = %e, "cannot start the store scrub");
                    continue;
                }
                match rx.await {
                    Ok(Ok(sum)) => {
                        let damaged = sum.verify.damaged();
                        let line = format!(
                            "{} repaired from parity, {} from the second copy, {} sidecar(s) rewritten, {} object(s) dropped, {} unrepairable",
                            sum.rebuilt.len(),
                            sum.copied.len(),
                            sum.sidecars.len(),
                            sum.dropped_objects,
                            sum.unrepaired.len()
                        );
                        if damaged || !sum.unrepaired.is_empty() {
                            warn!(result = %line, "store scrub found damage it could not repair");
                        } else if sum.changed() {
                            warn!(result = %line, "store scrub repaired damage");
                        } else {
                            info!(objects = sum.verify.objects_checked, "store scrub: intact");
                        }
                    }
                    Ok(Err(e)) => warn!(error = %e, "store scrub failed"),
                    Err(_) => warn!("store scrub thread ended without a result"),
                }
            }
        }
        .instrument(span),
    )
}

/// Nice 19 and the idle I/O class for the calling thread.
fn lowest_priority() {
    // SAFETY: plain syscalls on the calling thread (tid), no memory shared.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        // ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_IDLE << 13)
        libc::syscall(libc::SYS_ioprio_set, 1, tid, 3 << 13);
    }
}
