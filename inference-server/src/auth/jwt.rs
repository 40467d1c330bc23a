//! Entra ID style bearer tokens: a JWT signed by one of the issuer's keys (a JWKS file,
//! re-read when it changes), with the configured issuer and audience, not expired.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

/// Validates tokens; cheap to clone.
#[derive(Debug, Clone)]
pub struct JwtValidator {
    issuer: String,
    audience: String,
    jwks_file: PathBuf,
    keys: Arc<RwLock<JwkSet>>,
}

/// Why the validator could not start.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read the JWKS file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a JWKS document (`{{\"keys\": [...]}}`): {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Asymmetric algorithms only: a symmetric one would let anyone holding the public JWKS sign.
const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

impl JwtValidator {
    /// Reads the JWKS file once.
    pub fn load(issuer: &str, audience: &str, jwks_file: &Path) -> Result<Self, JwksError> {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let keys = read_jwks(jwks_file)?;
        Ok(Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            jwks_file: jwks_file.to_owned(),
            keys: Arc::new(RwLock::new(keys)),
        })
    }

    /// Checks signature, issuer, audience and expiry. The reason is safe to show the caller.
    pub fn validate(&self, token: &str) -> Result<(), String> {
        let header = decode_header(token).map_err(|_| "malformed token".to_owned())?;
        if !ALLOWED.contains(&header.alg) {
            return Err(format!(
                "signing algorithm {:?} is not accepted",
                header.alg
            ));
        }
        let keys = self
            .keys
            .read()
            .map_err(|_| "signing keys unavailable".to_owned())?;
        let jwk = match &header.kid {
            Some(kid) => keys.find(kid),
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => None,
        }
        .ok_or_else(|| "no signing key matches the token's key id".to_owned())?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| "unusable signing key".to_owned())?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = 60;
        decode::<serde_json::Value>(token, &key, &validation)
            .map(|_| ())
            .map_err(|err| {
                use jsonwebtoken::errors::ErrorKind;
                match err.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired".into(),
                    ErrorKind::InvalidIssuer => "wrong issuer".into(),
                    ErrorKind::InvalidAudience => "wrong audience".into(),
                    ErrorKind::InvalidSignature => "bad signature".into(),
                    ErrorKind::MissingRequiredClaim(claim) => format!("missing claim '{claim}'"),
                    _ => "invalid token".into(),
                }
            })
    }

    /// Re-reads the JWKS file every `period` (key rollover without a restart).
    pub fn watch(&self, period: Duration) {
        let validator = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            loop {
                ticker.tick().await;
                let Ok(fresh) = read_jwks(&validator.jwks_file) else {
                    continue;
                };
                let Ok(mut keys) = validator.keys.write() else {
                    return;
                };
                if keys.keys.len() != fresh.keys.len()
                    || serde_json::to_value(&*keys).ok() != serde_json::to_value(&fresh).ok()
                {
                    *keys = fresh;
                    tracing::info!(file = %validator.jwks_file.display(), "signing keys reloaded");
                }
            }
        });
    }
}

fn read_jwks(path: &Path) -> Result<JwkSet, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|err| JwksError::Invalid {
        path: path.to_owned(),
        reason: err.to_string(),
    })
}
