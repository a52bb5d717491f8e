fn main() -> std::process::ExitCode {
    // When ssh starts us as its askpass helper for a key passphrase.
    if offsite::transport::openssh::askpass_main() {
        return std::process::ExitCode::SUCCESS;
    }
    fixed_mmap_threshold();
    no_library_backtraces();
    offsite::cli::main()
}

/// rustic_core makes an error, with `Backtrace::capture()`, for each
/// chunk its index does not hold: with `RUST_BACKTRACE=1` in the
/// environment that unwinds the stack for every new chunk of a run. Our
/// messages never show those backtraces, so they are off unless
/// `RUST_LIB_BACKTRACE` asks for them; a panic's backtrace still
/// follows `RUST_BACKTRACE`.
fn no_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called before any other thread exists.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

/// Large blocks (S3 part buffers, HTTP and wasm buffers) come straight from
/// mmap and go back to the kernel when freed. glibc otherwise raises its
/// mmap threshold each time such a block is freed, so later ones land in
/// the heap, which fragments and keeps the peak. Measured on a run into
/// S3: a 96 MiB output peaked up to 10 MiB above a 24 MiB one; with a
/// fixed threshold the two peak within 2 MiB of each other.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
