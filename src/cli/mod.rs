//! The `ublk-ploop` command line: parse, then hand each verb group to its
//! file. The verb files print through `output` and never import this one.

mod args;
mod copy_cmd;
mod device_cmd;
mod image_cmd;
mod output;
mod signals;
mod snapshot_cmd;

use std::io::IsTerminal;

use clap::{CommandFactory, FromArgMatches};

use ublk_ploop::Result;

use args::{Cli, Command};

pub fn main() -> i32 {
    // A command whose reader went away ends quietly, as Unix tools do
    // (`info --json | grep -q`), instead of panicking on the write. The
    // daemon puts this back to "ignore" before it serves.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Usage errors exit 1, never 2: 2 is `check`'s "image is corrupt".
    let parsed = Cli::command().try_get_matches().and_then(|m| Ok((Cli::from_arg_matches(&m)?, asks_json(&m))));
    let (cli, json) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    init_logging(cli.verbose);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ublk-ploop: error: {e}");
            if json {
                // A script reading stdout gets an answer it can parse, in
                // the shape of the control socket's failed replies.
                output::print_json(&serde_json::json!({ "ok": false, "error": e.message(), "errno": e.errno() }));
            }
            1
        }
    }
}

/// Whether the verb given (at any depth of subcommands) has `--json`,
/// and stdout is ours to answer on: not when it carries a copy's stream
/// (`--to -`), where reports go to stderr.
fn asks_json(m: &clap::ArgMatches) -> bool {
    match m.subcommand() {
        Some((_, sub)) => {
            let streams = matches!(sub.try_get_one::<std::path::PathBuf>("to"), Ok(Some(to)) if to.as_os_str() == "-");
            !streams && (matches!(sub.try_get_one::<bool>("json"), Ok(Some(true))) || asks_json(sub))
        }
        None => false,
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // journald stamps every line itself; plain lines read best there.
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn run(command: Command) -> Result<i32> {
    // Before any image is opened: every read-write open of one left in use
    // applies the link log a killed daemon left (or is refused without it).
    ublk_ploop::layers::ploop::links::set_leftover_dir(Some(crate::daemon::config::link_dir_path()));
    match command {
        Command::Image(c) => image_cmd::run(c),
        Command::Device(c) => device_cmd::run(c),
        Command::Convert(a) => image_cmd::convert_cmd(a),
        Command::Snapshot(c) => snapshot_cmd::run(c),
        Command::Copy(c) => copy_cmd::run(c),
    }
}
