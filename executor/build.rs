//! Generates the gRPC code for `proto/stepbox/v1/*.proto` and a file descriptor set for server
//! reflection. protoc comes from `protoc-bin-vendored` unless `PROTOC` points at one already.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=PROTOC");
    println!("cargo:rerun-if-changed=../proto");
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        #[allow(unsafe_code)]
        // SAFETY: no other thread exists in this build script.
        unsafe {
            std::env::set_var("PROTOC", protoc);
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // google/protobuf/*.proto (Timestamp) ship with the vendored protoc.
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("stepbox_descriptor.bin"))
        .compile_protos(
            &[
                PathBuf::from("../proto/stepbox/v1/executor.proto"),
                PathBuf::from("../proto/stepbox/v1/catalog.proto"),
                PathBuf::from("../proto/stepbox/v1/workflow.proto"),
            ],
            &[PathBuf::from("../proto"), well_known],
        )?;
    Ok(())
}
