//! Kubeconfig files for the test control plane's clients.

use crate::pki::CertAndKey;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::io::Write;
use std::path::Path;

/// Writes a kubeconfig that reaches `server` with a client certificate, trusting `ca_pem`.
pub fn write(
    path: &Path,
    server: &str,
    ca_pem: &str,
    client: &CertAndKey,
    user: &str,
) -> std::io::Result<()> {
    let b64 = |s: &str| STANDARD.encode(s.as_bytes());
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: llama-test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: llama-test
  context:
    cluster: llama-test
    user: {user}
current-context: llama-test
",
        ca = b64(ca_pem),
        cert = b64(&client.cert_pem),
        key = b64(&client.key_pem),
    );
    let mut file = std::fs::File::create(path)?;
    file.write_all(text.as_bytes())
}

/// Writes a kubeconfig that reaches `server` with a bearer token (a ServiceAccount's), trusting
/// `ca_pem`.
pub fn write_token(
    path: &Path,
    server: &str,
    ca_pem: &str,
    token: &str,
    user: &str,
) -> std::io::Result<()> {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: llama-test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: llama-test
  context:
    cluster: llama-test
    user: {user}
current-context: llama-test
",
        ca = STANDARD.encode(ca_pem.as_bytes()),
    );
    let mut file = std::fs::File::create(path)?;
    file.write_all(text.as_bytes())
}
