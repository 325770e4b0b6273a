//! `cachetier-operator`: the operator binary.
//!
//! Subcommands:
//! - `crd`: print the CacheTier CustomResourceDefinition as YAML.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cachetier-operator",
    version,
    about = "The cachetier operator: Redis Cluster cache tiers that survive silent node failures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CacheTier CustomResourceDefinition (YAML) on stdout.
    ///
    /// `crds/cachetier.yaml` is exactly this output; `scripts/generate.sh`
    /// rewrites it and `scripts/generate.sh --check` fails on drift.
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", cachetier_crds::crd_yaml()?),
    }
    Ok(())
}
