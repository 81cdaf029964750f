//! Reports to the operator (`SLUICE_REPORT_URL`) for jobs whose storage only their pods can
//! reach: the plan summary, progress records and the manifest counts, POSTed as JSON with the
//! job's bearer token. A lost intermediate report is harmless (the next one supersedes it);
//! final reports are retried, since a standby operator replica answers 503.

use std::time::Duration;

use sluice_api::report::PodReport;

/// POSTs [`PodReport`]s to the operator.
#[derive(Clone, Debug)]
pub struct ReportClient {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl ReportClient {
    /// A client for `url` with `token`; `None` when no URL is set (the operator reads storage
    /// itself, or local mode).
    pub fn new(url: Option<&str>, token: Option<&str>) -> Result<Option<Self>, String> {
        let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("{}: {url:?} is not an http:// or https:// URL", sluice_api::contract::env::REPORT_URL));
        }
        // No kept-alive connections: behind a Service each retry must be free to reach another
        // operator replica (a standby answers 503); reports are a few a minute, so nothing is lost.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("cannot build the report client: {e}"))?;
        Ok(Some(Self { http, url: url.to_string(), token: token.unwrap_or_default().to_string() }))
    }

    /// Send `report`, trying up to `attempts` times (1 s, 2 s, 4 s … apart, at most 8 s).
    pub async fn send(&self, report: &PodReport, attempts: usize) -> Result<(), String> {
        let body = serde_json::to_vec(report).map_err(|e| format!("cannot serialize the report: {e}"))?;
        let mut last = String::new();
        for attempt in 0..attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1u64 << (attempt - 1).min(3))).await;
            }
            let sent = self
                .http
                .post(&self.url)
                .bearer_auth(&self.token)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    last = format!("{} answered {status}: {}", self.url, text.trim());
                    // A bad token or an unknown job will not get better by retrying.
                    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::BAD_REQUEST {
                        break;
                    }
                }
                Err(e) => last = format!("POST {}: {e}", self.url),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls() {
        assert!(ReportClient::new(None, None).unwrap().is_none());
        assert!(ReportClient::new(Some(" "), None).unwrap().is_none());
        assert!(ReportClient::new(Some("ftp://x"), None).unwrap_err().contains("SLUICE_REPORT_URL"));
        assert!(ReportClient::new(Some("http://127.0.0.1:1/v1/jobs/a/b/reports"), Some("t")).unwrap().is_some());
    }

    #[tokio::test]
    async fn an_unreachable_operator_is_an_error_not_a_panic() {
        let c = ReportClient::new(Some("http://127.0.0.1:1/v1/jobs/a/b/reports"), Some("t")).unwrap().unwrap();
        let err = c.send(&PodReport::PlanFailed { failure: sluice_api::report::PlanFailure::Permanent, message: "x".into() }, 1).await;
        assert!(err.unwrap_err().contains("127.0.0.1:1"));
    }
}
