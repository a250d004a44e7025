//! Why the daemon refused a request: an [`ErrorCode`] and a message, sent back as `ERROR`.

use aegis_shm_client::protocol::{ErrorCode, Reply};

/// A refused request: the code and message of the `ERROR` reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct Refusal {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorCode::BadRequest, message)
    }

    /// `internal`, from any error.
    pub fn internal(e: impl std::fmt::Display) -> Refusal {
        Refusal::new(ErrorCode::Internal, e.to_string())
    }

    /// `bad_name` for a `what` named `name` outside `[A-Za-z0-9._-]{1,64}`.
    pub fn bad_name(what: &str, name: &str) -> Refusal {
        Refusal::new(
            ErrorCode::BadName,
            format!("{what} {name:?} must match [A-Za-z0-9._-]{{1,64}}"),
        )
    }

    /// `no_session` for `name`.
    pub fn no_session(name: &str) -> Refusal {
        Refusal::new(ErrorCode::NoSession, format!("no session named {name:?}"))
    }
}

impl From<Refusal> for Reply {
    fn from(r: Refusal) -> Reply {
        Reply::Error {
            code: r.code,
            message: r.message,
        }
    }
}
