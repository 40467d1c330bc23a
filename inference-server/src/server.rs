//! `llama-server serve`: bind, load the model in the background (readiness turns green when it
//! is loaded), serve, and on SIGTERM or Ctrl-C drain: readiness and new requests answer 503,
//! no new connections are accepted, in-flight requests and streams may finish until the drain
//! deadline, then the process exits 0.

use std::sync::Arc;
use std::time::Duration;

use crate::args::ServeArgs;
use crate::auth::{Authenticator, JwtValidator, KeyStore};
use crate::device::{DEVICE_ENV, DeviceSpec};
use crate::server_config::{AuthMode, ServerConfig};
use crate::state::AppState;

/// How often key and JWKS files are re-read.
const CREDENTIAL_POLL: Duration = Duration::from_secs(2);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::server_config::ConfigError),
    #[error(transparent)]
    Keys(#[from] crate::auth::keys::KeyError),
    #[error(transparent)]
    Jwks(#[from] crate::auth::jwt::JwksError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("cannot load the model: {0}")]
    Model(String),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the authenticator the configuration asks for.
pub fn authenticator(config: &ServerConfig) -> Result<Authenticator, ServeError> {
    Ok(match config.auth.mode {
        AuthMode::Key => Authenticator::Keys(KeyStore::load(&config.auth.keys_dir)?),
        AuthMode::Token => {
            let Some(token) = &config.auth.token else {
                return Err(ServeError::Model(
                    "auth.token is required with auth.mode: token".into(),
                ));
            };
            Authenticator::Token(JwtValidator::load(
                &token.issuer,
                &token.audience,
                &token.jwks_file,
            )?)
        }
        AuthMode::None => {
            tracing::warn!("authentication is OFF (auth.mode: none): anyone can call this server");
            Authenticator::Open
        }
    })
}

/// Runs the server until it has drained after a shutdown signal.
pub async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    let device = DeviceSpec::choose(
        args.device,
        std::env::var(DEVICE_ENV).ok().as_deref(),
        config.device.as_deref(),
    )?;
    // A missing driver or GPU stops the server here, before it listens: the pod crash-loops
    // with this message instead of serving 503s.
    let gpus = config.gpu_count();
    device.open_several(gpus)?;
    if device == DeviceSpec::Cpu && gpus > 1 {
        tracing::info!(
            gpus,
            "gpus is for GPU devices: the CPU runs the whole model"
        );
    }
    tracing::info!(%device, gpus, dtype = ?device.default_dtype(), "compute device");
    config.device = Some(device.to_string());
    let auth = authenticator(&config)?;
    match &auth {
        Authenticator::Keys(store) => store.watch(CREDENTIAL_POLL),
        Authenticator::Token(validator) => validator.watch(CREDENTIAL_POLL),
        Authenticator::Open => {}
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: args.listen,
            source,
        })?;
    let state = AppState::new(config, auth);
    tracing::info!(listen = %args.listen, model = %state.config.model_name, "llama-server listening; loading the model");

    let (load_failed, mut load_failure) = tokio::sync::oneshot::channel::<String>();
    let loader = Arc::clone(&state);
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        match loader.load_engine() {
            Ok(()) => tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                "model loaded; ready"
            ),
            Err(err) => {
                let _ = load_failed.send(err);
            }
        }
    });

    let (signalled_tx, signalled_rx) = tokio::sync::watch::channel(false);
    let drain_state = Arc::clone(&state);
    let shutdown = async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal: draining");
        drain_state.start_draining();
        let _ = signalled_tx.send(true);
    };
    let app = crate::app(Arc::clone(&state));
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let deadline = async move {
        let mut signalled = signalled_rx;
        while !*signalled.borrow() {
            if signalled.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        tokio::time::sleep(Duration::from_secs(args.drain_seconds)).await;
    };
    tokio::select! {
        result = server => result?,
        () = deadline => tracing::warn!(seconds = args.drain_seconds, "drain deadline reached; exiting with requests still open"),
        Ok(message) = &mut load_failure => return Err(ServeError::Model(message)),
    }
    tracing::info!("drained; exiting");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
