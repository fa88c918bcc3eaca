//! Why a checkpoint or a restore failed, typed by the step that failed, so
//! that the loop decides by kind (try an older image, retry later, retry
//! eagerly, give way) and status can say which step it was.

use std::fmt;

/// The steps of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointStep {
    /// Preparing the staging directory.
    Stage,
    /// CRIU's dump.
    Dump,
    /// Recording the job's files at `post-dump`.
    Capture,
    /// Storing the dump in the store.
    Ingest,
    /// Making the checkpoint visible.
    Publish,
}

impl CheckpointStep {
    /// The step's name, as status shows it.
    pub fn name(self) -> &'static str {
        match self {
            CheckpointStep::Stage => "stage",
            CheckpointStep::Dump => "dump",
            CheckpointStep::Capture => "capture",
            CheckpointStep::Ingest => "ingest",
            CheckpointStep::Publish => "publish",
        }
    }
}

/// Why a checkpoint was not published (the job keeps running either way).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Another copy of this job (Slurm) took over the image store: this
    /// copy must publish nothing more and stop its job.
    #[error("superseded: {0}")]
    Superseded(String),
    /// The job had already ended.
    #[error("the job has already ended")]
    Ended,
    /// A step failed.
    #[error("{}: {message}", step.name())]
    Failed {
        /// Which.
        step: CheckpointStep,
        /// Why.
        message: String,
        /// Only a resource of supervise's ran short.
        resource: bool,
    },
}

impl CheckpointError {
    /// Step `step` failed for `message`.
    pub fn failed(step: CheckpointStep, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Failed {
            step,
            message: message.into(),
            resource: false,
        }
    }

    /// The step's name ("fence" for a superseded copy).
    pub fn step(&self) -> &'static str {
        match self {
            CheckpointError::Superseded(_) => "fence",
            CheckpointError::Ended => "dump",
            CheckpointError::Failed { step, .. } => step.name(),
        }
    }

    /// Only a resource of supervise's ran short.
    pub fn is_resource(&self) -> bool {
        matches!(self, CheckpointError::Failed { resource: true, .. })
    }
}

/// The steps of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreStep {
    /// Listing the images.
    List,
    /// Writing the image out (every piece verified).
    Materialise,
    /// Putting the job's files back as they were at the checkpoint.
    Rollback,
    /// CRIU's restore.
    CriuRestore,
    /// Checking the restored descriptors before the job runs.
    Verify,
    /// A lazy restore's own part (its daemon, its page serving).
    Lazy,
    /// Starting the command afresh.
    Launch,
}

impl RestoreStep {
    /// The step's name, as status shows it.
    pub fn name(self) -> &'static str {
        match self {
            RestoreStep::List => "list",
            RestoreStep::Materialise => "materialise",
            RestoreStep::Rollback => "rollback",
            RestoreStep::CriuRestore => "criu-restore",
            RestoreStep::Verify => "verify",
            RestoreStep::Lazy => "lazy",
            RestoreStep::Launch => "launch",
        }
    }
}

/// What a failed restore says about what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// This image (or the job's files, or CRIU) is in the way: try the
    /// next older image. For [`RestoreStep::Lazy`]: try the same image
    /// eagerly first.
    Image,
    /// A resource of supervise's ran short (descriptors, memory, space):
    /// nothing is known to be wrong with any image; try again later,
    /// never an older image, never a fresh start.
    Resource,
    /// Not enough memory to write the image out without it touching the
    /// disk (the store seals): a lazy restore may fit; else like
    /// [`Cause::Resource`].
    NoRoom,
}

/// Why a restore (or a launch) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreError {
    /// The step that failed.
    pub step: RestoreStep,
    /// What that means for the next try.
    pub cause: Cause,
    /// Why, in words.
    pub message: String,
}

impl RestoreError {
    /// `step` failed because of the image (or the files, or CRIU).
    pub fn image(step: RestoreStep, message: impl Into<String>) -> RestoreError {
        RestoreError {
            step,
            cause: Cause::Image,
            message: message.into(),
        }
    }

    /// `step` failed because a resource ran short.
    pub fn resource(step: RestoreStep, message: impl Into<String>) -> RestoreError {
        RestoreError {
            step,
            cause: Cause::Resource,
            message: message.into(),
        }
    }

    /// `step` failed with the OS error `e`: a resource shortage or not,
    /// as the error says.
    pub fn io(step: RestoreStep, message: impl Into<String>, e: &std::io::Error) -> RestoreError {
        if crate::fdlimit::is_resource_error(e) {
            RestoreError::resource(step, message)
        } else {
            RestoreError::image(step, message)
        }
    }

    /// A lazy restore's own part failed: the same image may restore
    /// eagerly.
    pub fn is_lazy(&self) -> bool {
        self.step == RestoreStep::Lazy && self.cause == Cause::Image
    }

    /// Only a resource of supervise's ran short (or memory to write the
    /// image out): retry later.
    pub fn is_resource(&self) -> bool {
        matches!(self.cause, Cause::Resource | Cause::NoRoom)
    }
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step.name(), self.message)
    }
}

impl std::error::Error for RestoreError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_their_step_and_kind() {
        let e = CheckpointError::failed(CheckpointStep::Capture, "no files");
        assert_eq!(e.to_string(), "capture: no files");
        assert_eq!(e.step(), "capture");
        assert!(!e.is_resource());
        assert_eq!(CheckpointError::Superseded("x".into()).step(), "fence");
        let r = RestoreError::io(
            RestoreStep::Materialise,
            "cannot write",
            &std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(r.is_resource() && !r.is_lazy());
        assert_eq!(r.to_string(), "materialise: cannot write");
        assert!(RestoreError::image(RestoreStep::Lazy, "page").is_lazy());
        assert!(!RestoreError::image(RestoreStep::CriuRestore, "refused").is_lazy());
    }
}
