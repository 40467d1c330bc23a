//! The operator layer's error type. A spec the user must fix is not an error here: it becomes a
//! status condition (see `validate::SpecError`). These are the failures worth a retry.

use crate::build::BuildError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building objects: {0}")]
    Build(#[from] BuildError),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// A short, stable label for the failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Build(_) => "build",
            Error::Finalizer(_) => "finalizer",
            Error::Other(_) => "other",
        }
    }
}
