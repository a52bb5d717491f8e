fn main() -> std::process::ExitCode {
    offsite::cli::main()
}
