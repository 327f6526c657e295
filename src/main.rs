//! The `ublk-ploop` command: offline image tools and the ublk daemon.

mod cli;
mod control;
mod daemon;
mod mount;
mod pace;
mod ublk_control;
mod ublk_target;

fn main() {
    std::process::exit(cli::main());
}
