//! Reading every running instance's `/metrics`, all at once, each with a deadline.

use super::sample::Sample;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use std::time::Duration;

/// How long one instance may take to answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// The server container's port when the pod does not name one `http`.
const DEFAULT_PORT: i32 = 8080;

/// An instance to read: a running, not terminating server pod with an IP.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub pod: String,
    pub uid: String,
    pub url: String,
}

/// The pods whose metrics count: phase Running, an IP, not being deleted. Pending pods (not yet
/// started) are left out: they have no load and no server to ask.
pub fn targets(pods: &[Pod]) -> Vec<Target> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            if status.phase.as_deref() != Some("Running") {
                return None;
            }
            let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
            let port = p
                .spec
                .as_ref()
                .and_then(|s| {
                    s.containers.iter().find_map(|c| {
                        c.ports
                            .as_ref()?
                            .iter()
                            .find(|port| port.name.as_deref() == Some("http"))
                            .map(|port| port.container_port)
                    })
                })
                .unwrap_or(DEFAULT_PORT);
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_owned()
            };
            Some(Target {
                pod: p.name_any(),
                uid: p.uid().unwrap_or_default(),
                url: format!("http://{host}:{port}/metrics"),
            })
        })
        .collect()
}

/// Reads every target concurrently; each gets its sample or the reason it has none.
pub async fn scrape(
    http: &reqwest::Client,
    targets: &[Target],
) -> Vec<(Target, Result<Sample, String>)> {
    let reads = targets.iter().map(|t| async move {
        let result = async {
            let response = http
                .get(&t.url)
                .timeout(SCRAPE_TIMEOUT)
                .send()
                .await
                .map_err(|e| format!("GET {}: {e}", t.url))?;
            if !response.status().is_success() {
                return Err(format!("GET {}: HTTP {}", t.url, response.status()));
            }
            let text = response
                .text()
                .await
                .map_err(|e| format!("GET {}: {e}", t.url))?;
            Sample::parse(&text).map_err(|e| format!("{}: {e}", t.url))
        }
        .await;
        (t.clone(), result)
    });
    futures::future::join_all(reads).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).expect("pod")
    }

    #[test]
    fn only_running_pods_with_an_ip_and_not_deleted_are_read() {
        let pods = vec![
            pod(r#"
metadata: {name: a, uid: u1}
spec: {containers: [{name: server, ports: [{name: http, containerPort: 9000}]}]}
status: {phase: Running, podIP: 10.246.0.7}
"#),
            pod(r#"
metadata: {name: b}
spec: {containers: [{name: server}]}
status: {phase: Pending}
"#),
            pod(r#"
metadata: {name: c, deletionTimestamp: "2026-01-01T00:00:00Z"}
spec: {containers: [{name: server}]}
status: {phase: Running, podIP: 10.246.0.8}
"#),
            pod(r#"
metadata: {name: d}
spec: {containers: [{name: server}]}
status: {phase: Running, podIP: "fd00::5"}
"#),
        ];
        let t = targets(&pods);
        assert_eq!(
            t.iter().map(|t| t.url.as_str()).collect::<Vec<_>>(),
            [
                "http://10.246.0.7:9000/metrics",
                "http://[fd00::5]:8080/metrics"
            ]
        );
        assert_eq!(t[0].uid, "u1");
    }
}
