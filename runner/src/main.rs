fn main() -> std::process::ExitCode {
    // When ssh starts us as its askpass helper for a key passphrase.
    if offsite::transport::openssh::askpass_main() {
        return std::process::ExitCode::SUCCESS;
    }
    offsite::cli::main()
}
