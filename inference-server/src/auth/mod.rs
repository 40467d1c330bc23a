//! Who may call the model: either of two keys (re-read from their files when they change) or an
//! Entra ID style JWT. Failures are 401 with the Azure body; keys and tokens are never logged.

pub mod jwt;
pub mod keys;

use axum::http::HeaderMap;

use crate::azure::ApiError;
pub use jwt::JwtValidator;
pub use keys::KeyStore;

/// The configured check.
#[derive(Debug, Clone)]
pub enum Authenticator {
    Keys(KeyStore),
    Token(JwtValidator),
    /// Local trials only.
    Open,
}

impl Authenticator {
    /// Checks a request's headers.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self {
            Self::Open => Ok(()),
            Self::Keys(store) => {
                let presented = presented_credentials(headers);
                if presented.is_empty() {
                    return Err(ApiError::unauthorized(
                        "Missing credentials: send a key in the 'api-key' header or as \
                         'Authorization: Bearer <key>'.",
                    ));
                }
                if presented.iter().any(|key| store.matches(key)) {
                    Ok(())
                } else {
                    Err(ApiError::unauthorized(
                        "Access denied due to an invalid key. Use one of the deployment's two \
                         keys.",
                    ))
                }
            }
            Self::Token(validator) => {
                let Some(token) = bearer(headers) else {
                    return Err(ApiError::unauthorized(
                        "Missing token: send 'Authorization: Bearer <token>'.",
                    ));
                };
                validator.validate(token).map_err(|reason| {
                    ApiError::unauthorized(format!("The token is not valid: {reason}."))
                })
            }
        }
    }
}

/// Every credential the request carries: `api-key`, `Authorization: Bearer <key>`, or a bare
/// `Authorization: <key>`.
fn presented_credentials(headers: &HeaderMap) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some(key) = headers.get("api-key").and_then(|v| v.to_str().ok()) {
        out.push(key.trim());
    }
    if let Some(auth) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let auth = auth.trim();
        match auth.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => out.push(rest.trim()),
            _ => out.push(auth),
        }
    }
    out
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, rest) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}
