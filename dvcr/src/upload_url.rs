//! `dvcr upload-url`: asks a running `dvcr serve --upload-key-file ...` for a signed,
//! expiring upload URL pair and prints its JSON answer (`{"external": ..., "inCluster":
//! ...}`, both usable with `curl -T`).

use std::process::ExitCode;

/// Arguments of `dvcr upload-url`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The registry serving uploads.
    #[arg(long, default_value = "http://127.0.0.1:5000")]
    server: String,

    /// The image the URL uploads to: repository:tag, e.g. vi/ns/name:uid.
    #[arg(long)]
    dest: String,

    /// How long the URL stays valid (e.g. 1h, 30m, 600s).
    #[arg(long, default_value = "1h")]
    ttl: String,
}

/// Runs `dvcr upload-url`.
pub fn run(args: &Args) -> ExitCode {
    match ask(args) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ask(args: &Args) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}/upload-urls", args.server.trim_end_matches('/'));
    let body = serde_json::json!({"dest": args.dest, "ttl": args.ttl});
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let response = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("asking {url}: {e}"))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            anyhow::bail!(
                "{url} answered {status}: {}{}",
                text.trim(),
                if status == reqwest::StatusCode::NOT_FOUND {
                    " (is dvcr serve running with --upload-key-file?)"
                } else {
                    ""
                }
            );
        }
        Ok(serde_json::from_str(&text)?)
    })
}
