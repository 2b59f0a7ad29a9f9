//! The `faultvisor` binary: a thin wrapper around the `cli` crate.

fn main() {
    std::process::exit(cli::main());
}
