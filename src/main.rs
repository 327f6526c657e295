//! The `ublk-ploop` command: offline image tools and the ublk daemon.

mod cli;
mod control;
mod daemon;
mod mount;
mod pace;
mod ublk_control;
mod ublk_target;

// Paths the CLI still names: the control messages live in the library,
// the configuration file with the daemon.
use daemon::config;
use ublk_ploop::protocol;

fn main() {
    std::process::exit(cli::main());
}
