//! The `ublk-ploop` command: offline image tools and the ublk daemon.

mod cli;
mod config;
mod control;
mod copy_cmd;
mod daemon;
mod mount;
mod pace;
mod snapshot_cmd;
mod ublk_control;
mod ublk_target;

// The control messages live in the library; the CLI still names them here.
use ublk_ploop::protocol;

fn main() {
    std::process::exit(cli::main());
}
