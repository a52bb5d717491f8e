fn main() -> std::process::ExitCode {
    // When ssh starts us as its askpass helper for a key passphrase.
    if offsite::transport::openssh::askpass_main() {
        return std::process::ExitCode::SUCCESS;
    }
    // When systemd runs us as the unit generator.
    if let Some(code) = offsite::systemd::generator_main() {
        return code;
    }
    offsite::cli::main()
}
