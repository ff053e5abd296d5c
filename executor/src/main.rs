//! The `stepbox` binary: parses the command line and hands it to [`stepbox::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A sandbox worker started by this same binary: no command line, no async runtime of ours.
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(stepbox::sandbox::worker::WORKER_ARG.as_ref()) {
        let config = args.next().unwrap_or_default();
        return ExitCode::from(stepbox::sandbox::worker::main(&config.to_string_lossy()));
    }
    let cli = stepbox::cli::Cli::parse();
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
    // The trace exporter's gRPC channel lives on the runtime: set it up inside it.
    let telemetry = {
        let _rt = runtime.enter();
        match stepbox::service::telemetry::Telemetry::init(&cli.telemetry_settings()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("stepbox: error: {e:#}");
                return ExitCode::from(stepbox::cli::EXIT_BAD_REQUEST);
            }
        }
    };
    let code = runtime.block_on(cli.execute());
    telemetry.shutdown();
    code
}
