//! Deliberately broken builds, for proving that the deterministic
//! simulation catches a broken crash-ordering rule (#19's mutation check).
//!
//! `UBLK_PLOOP_MUTANT=NAME cargo test --test sim` compiles the engine
//! with the rule NAME switched off; without the variable (every normal
//! build) [`off`] is a constant false and the compiler drops the check.
//! Cargo rebuilds only this crate when the variable changes.
//!
//! The rules, by name:
//! - `copy-up-sync`: a copied-up (or whole-written) cluster is synced
//!   before its table entry links it.
//! - `store-before-swap`: the descriptor naming a new top is durable
//!   before the stack switches to it.
//! - `merge-final-sync`: a merge syncs the top before the parent leaves
//!   the descriptor.
//! - `attach-before-round`: a backup attaches its own tracker before it
//!   reads the record of changes (an incremental's first round).
//! - `compact-sync`: compaction syncs the clusters it copied before the
//!   table points at their new places.
//! - `fold-sync`: an online merge into the parent's file syncs that file
//!   before the descriptor names it as the top.
//! - `fold-catch-up`: an online merge into the parent's file copies again,
//!   with requests held, the clusters changed after their first copy.
//! - `link-mask`: table writes leave out the entries of copy-ups linked
//!   through the link log until their copies are synced.
//! - `link-settle-sync`: a flush syncs the logged copy-ups before it
//!   writes their entries.
//! - `link-replay`: a read-write open links what a killed session's link
//!   log recorded.
//! - `stale-block-log`: a copy-up is not linked through the log where a
//!   failed table write may have left a rolled-back entry on disk (caught
//!   by the test `TEST_RULES` names, which fails one block of a table
//!   write and lets the next land).
//!
//! And a fixed bug brought back, to show the simulation finds it from a
//! random seed:
//! - `merge-recheck`: a top merge ends by checking, with requests held,
//!   that no cluster fell back to the parent after a failed BAT write
//!   (the data-loss issue's item 2); the mutant returns after one pass.

const MUTANT: Option<&str> = option_env!("UBLK_PLOOP_MUTANT");

/// True when this build switches the rule `name` off.
pub const fn off(name: &str) -> bool {
    match MUTANT {
        Some(m) => eq(m.as_bytes(), name.as_bytes()),
        None => false,
    }
}

const fn eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The names a build may switch off (a script runs each in turn).
pub const RULES: [&str; 11] = [
    "copy-up-sync",
    "store-before-swap",
    "merge-final-sync",
    "attach-before-round",
    "compact-sync",
    "merge-recheck",
    "fold-sync",
    "fold-catch-up",
    "link-mask",
    "link-settle-sync",
    "link-replay",
];

/// Rules whose breach needs one exact failure (one block of a table write
/// failed, the other landed): each with the test that catches it
/// (`cargo test --test FILE NAME`); `scripts/sim-mutants` runs `RULES`.
pub const TEST_RULES: [(&str, &str); 1] = [("stale-block-log", "link_log a_copy_up_after_a_half_landed_bat_write_survives_a_kill")];

/// Refuse a mutant name that no rule has: a typo would otherwise build
/// an intact engine and "prove" nothing.
pub const fn known() -> bool {
    match MUTANT {
        None => true,
        Some(m) => {
            let mut i = 0;
            while i < RULES.len() {
                if eq(m.as_bytes(), RULES[i].as_bytes()) {
                    return true;
                }
                i += 1;
            }
            let mut i = 0;
            while i < TEST_RULES.len() {
                if eq(m.as_bytes(), TEST_RULES[i].0.as_bytes()) {
                    return true;
                }
                i += 1;
            }
            false
        }
    }
}

const _: () = assert!(known(), "UBLK_PLOOP_MUTANT names no rule in src/mutant.rs");
