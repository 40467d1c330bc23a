//! HTTP routes, one module per route group.

mod health;

use axum::Router;

/// All routes of the server.
pub fn router() -> Router {
    Router::new().merge(health::router())
}
