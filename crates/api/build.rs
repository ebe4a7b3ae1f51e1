//! Compiles `proto/cellpay.proto` with `protox` (pure Rust: no system `protoc`
//! needed) and generates the prost messages and the tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cellpay.proto");
    let file_descriptor_set = protox::compile(["proto/cellpay.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(file_descriptor_set)?;
    Ok(())
}
