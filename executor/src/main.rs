//! The `stepbox` binary: parses the command line and hands it to [`stepbox::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = stepbox::cli::Cli::parse();
    let filter = if cli.global.verbose {
        "stepbox=debug"
    } else {
        "stepbox=warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STEPBOX_LOG")
                .unwrap_or_else(|_| filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stepbox: error: failed to start the async runtime: {e}");
            return ExitCode::from(stepbox::cli::EXIT_HOST_ERROR);
        }
    };
    runtime.block_on(cli.execute())
}
