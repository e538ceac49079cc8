//! Command-line interface definition.

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;

/// What a target argument can be, for the help of every command that takes one.
const TARGET_HELP: &str =
    "A target (local directory, [user@]host:/path, ssh://...) or an environment of flip.toml";

#[derive(Parser, Debug)]
#[command(
    name = "flip",
    version,
    about = "Fast, atomic deploys: delta-sync a directory into a new release, then swap `current` in one rename."
)]
pub struct Cli {
    /// The configuration file (default: flip.toml in the working directory, if there is one).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print only errors on stderr (no progress, summary, notes or warnings).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More from a deploy: -v adds the scan's time and each target's time per phase (stderr),
    /// -vv also what happened to each path (the --itemize list, on stdout).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Deploy SOURCE as a new release of TARGET and make it live; or, with one argument, deploy
    /// environment ENV of flip.toml to all its targets (two phases: all or none go live).
    Deploy(DeployArgs),
    /// List the releases of TARGET.
    Releases(ReleasesArgs),
    /// Make the release before the live one live again (or --to ID).
    Rollback(RollbackArgs),
    /// Make release ID live.
    Activate(ActivateArgs),
    /// Delete old releases, keeping the newest N, the live one and the rollback target.
    Prune(PruneArgs),
    /// Re-read a release on TARGET (default: the live one) and compare it with its manifest.
    Verify(VerifyArgs),
    /// Show what a deploy from OLD to NEW would do and send over SSH (no target needed; to a
    /// local directory changed files go whole unless --no-whole-file).
    Diff(DiffArgs),
    /// Write a commented flip.toml for a PHP application in the working directory.
    Init(InitArgs),
    /// Print the settings environment ENV of flip.toml resolves to.
    Config(ConfigArgs),
    /// Check TARGET (or every target of ENV) read-only and say what is wrong, with the fix:
    /// `current`, incomplete releases, permissions, what a prune could not remove, free space,
    /// a running deploy, clock skew, and php's OPcache and realpath cache settings.
    Doctor(DoctorArgs),
    /// Print a shell completion script for SHELL on stdout (see README.md, "Shell completion
    /// and manual page").
    Completions(CompletionsArgs),
    /// Print flip's manual page (roff) on stdout: `flip man > flip.1`.
    Man,
    /// Serve the agent protocol on stdin/stdout (started by flip itself, locally or over SSH).
    #[command(hide = true)]
    Agent(AgentArgs),
    /// Print the blake3 of each FILE as `HASH  FILE` (run on a server to check an uploaded
    /// agent where b3sum is not installed).
    #[command(hide = true)]
    Blake3(Blake3Args),
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Print one JSON object on stdout instead of the human summary on stderr; an error is
    /// `{"error": {"code", "message"}}` on stdout, and its one line stays on stderr.
    #[arg(long)]
    pub json: bool,
    /// If another deploy holds the target's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub ssh: SshArgs,
}

#[derive(Args, Debug, Clone, Default)]
pub struct SshArgs {
    /// SSH private key to try (after ssh-agent).
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Trust and remember a host key not yet in known_hosts (like OpenSSH's accept-new).
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// Use this command (e.g. "ssh -F cfg") as the SSH transport instead of the built-in client.
    #[arg(long, value_name = "CMD")]
    pub ssh_command: Option<String>,
    /// Path of the flip binary on the server (default: flip on PATH, else upload one).
    #[arg(long, value_name = "PATH")]
    pub remote_flip: Option<String>,
    /// Agent to upload to a server that has no flip of this version: flip or flip-agent of this
    /// version built for the server's `uname -sm` (default
    /// ~/.cache/flip/agents/flip-VERSION-OS-ARCH, else the flip-agent beside this flip, else
    /// this flip).
    #[arg(long, value_name = "FILE")]
    pub agent_binary: Option<PathBuf>,
    /// SSH config file (default ~/.ssh/config).
    #[arg(long, value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Directory to deploy (with TARGET), or an environment of flip.toml (alone).
    #[arg(value_name = "SOURCE|ENV")]
    pub first: String,
    /// Target root: a local directory, [user@]host:/path or ssh://user@host:port/path.
    #[arg(value_name = "TARGET")]
    pub target: Option<String>,
    /// A note stored with the release and shown by `flip releases` (one line of text, at most
    /// 200 characters; `flip activate ENV LABEL` finds releases by it).
    #[arg(long, value_name = "TEXT", value_parser = LabelParser)]
    pub label: Option<String>,
    /// Leave out paths matching this gitignore-style pattern (repeatable), on top of the patterns
    /// of SOURCE/.flipignore (which is read, never written).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Do not read SOURCE/.flipignore.
    #[arg(long)]
    pub no_flipignore: bool,
    /// Releases to keep after the deploy (the live one and the rollback target are always kept;
    /// default 5, or flip.toml's `keep`).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub keep: Option<u32>,
    /// Stage the release but leave `current` where it is; `flip activate` makes it live later.
    #[arg(long)]
    pub no_activate: bool,
    /// Show what the deploy would do against the live release, and change nothing (the counts,
    /// and one line per changed path, as --itemize).
    #[arg(long)]
    pub dry_run: bool,
    /// List every changed path on stdout, one line each (in the JSON: "items").
    #[arg(long)]
    pub itemize: bool,
    /// zstd level for the connection, 1-19 (fixed); 0 turns compression off. Default over SSH:
    /// adaptive (levels 1-12, harder while the link is the bottleneck, cheaper while compressing
    /// is); for a local directory: 0 (compressing only costs CPU).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub compress_level: Option<i32>,
    /// Send every changed file whole, never as a patch or an rsync delta (as rsync's
    /// `--whole-file`). The default for a local directory, where bytes through a pipe cost less
    /// than making and applying a patch.
    #[arg(long, overrides_with = "no_whole_file")]
    pub whole_file: bool,
    /// Send changed files as patches or rsync deltas where they are smaller, to a local
    /// directory too (the default over SSH).
    #[arg(long, overrides_with = "whole_file")]
    pub no_whole_file: bool,
    /// Do not use or update flip's local caches (file hashes, manifests, deployed content).
    #[arg(long)]
    pub no_cache: bool,
    /// Make a release even where the live release already is this tree.
    #[arg(long)]
    pub force_release: bool,
    /// Targets worked on at once (default: all, or flip.toml's `parallel`).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub parallel: Option<usize>,
    /// Create the target directory's missing parent directories too (by default only the target
    /// directory itself is created, when its parent exists).
    #[arg(long)]
    pub mkpath: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct ReleasesArgs {
    #[arg(help = TARGET_HELP)]
    pub target: String,
    /// Print JSON on stdout instead of text (see README.md for its shape).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub ssh: SshArgs,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    #[arg(help = TARGET_HELP)]
    pub target: String,
    /// Release to go back to (default: the newest one older than the live one).
    #[arg(long, value_name = "ID")]
    pub to: Option<u64>,
    /// Go back even to a release that changed since it was deployed (edited, chmodded, removed
    /// or added in place): it is made live as it is.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct ActivateArgs {
    #[arg(help = TARGET_HELP)]
    pub target: String,
    /// A release id; for an environment, a label too (each target's newest release with it).
    pub id: String,
    /// Make it live even if it changed since it was deployed (edited, chmodded, removed or
    /// added in place): as it is.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[arg(help = TARGET_HELP)]
    pub target: String,
    /// Releases to keep (default 5, or flip.toml's `keep`).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub keep: Option<u32>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[arg(help = TARGET_HELP)]
    pub target: String,
    /// Release to verify (default: the live one).
    pub id: Option<u64>,
    /// Print JSON on stdout instead of text (see README.md for its shape).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub ssh: SshArgs,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// A target (local directory, [user@]host:/path, ssh://...) or an environment of flip.toml.
    pub target: String,
    /// One JSON object on stdout: {"hosts": [...], "summary": {...}}.
    #[arg(long)]
    pub json: bool,
    /// Warnings make a target unhealthy too (exit 11), not only problems.
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub ssh: SshArgs,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The tree that is live.
    pub old: PathBuf,
    /// The tree to deploy.
    pub new: PathBuf,
    /// Print JSON on stdout instead of text (see README.md for its shape).
    #[arg(long)]
    pub json: bool,
    /// Leave out paths matching this gitignore-style pattern (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Do not read .flipignore in either tree.
    #[arg(long)]
    pub no_flipignore: bool,
    /// List every changed path on stdout, one line each (in the JSON: "items").
    #[arg(long)]
    pub itemize: bool,
    /// Predict for a client without flip's caches (no patches from the content cache); by
    /// default, for the client that deployed OLD and kept its caches.
    #[arg(long)]
    pub no_cache: bool,
    /// zstd level to estimate with, as for deploy.
    #[arg(long, default_value_t = 3, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub compress_level: i32,
    /// zstd level of the bound (`zstd --long --patch-from` of the changed files against their
    /// old versions): 19 is the best and the slowest (about 1–2 MB/s per core); 0 leaves the
    /// bound out.
    #[arg(long, default_value_t = 19, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub bound_level: i32,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Overwrite an existing flip.toml.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// The environment.
    pub env: String,
    /// Print JSON on stdout instead of text (see README.md for its shape).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The target root this agent serves.
    #[arg(long, value_name = "PATH")]
    pub root: PathBuf,
    /// Create the root's missing parent directories too when a deploy creates the root.
    #[arg(long)]
    pub mkpath: bool,
    /// Give up on a client that sends nothing for this many seconds (its staging directory is
    /// removed and the lock released); 0 = wait forever.
    #[arg(long, value_name = "SECS", default_value_t = crate::agent_cmd::DEFAULT_IDLE_SECS)]
    pub idle_timeout: u64,
    /// The first bytes of the session's input, in base64, in one or more words (what an SSH
    /// client sends in the command line, to save the round trip the channel's window costs).
    #[arg(long, value_name = "BASE64", hide = true)]
    pub preamble: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: Shell,
}

/// The shells `flip completions` writes a script for.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug)]
pub struct Blake3Args {
    /// Files to hash.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `--label TEXT`: one line of text an operator can read back and type, so `flip releases`
/// shows it as given and `flip activate ENV LABEL` can name it: not empty, at most
/// [`LABEL_MAX`] characters, no space at either end, no control characters (a newline, an
/// escape sequence) and none of the characters a terminal shows as nothing or elsewhere
/// ([`crate::output::hidden`]: a zero-width space, a right-to-left override). The error never
/// repeats the value (clap's "invalid value '...'" would print it raw).
#[derive(Clone)]
struct LabelParser;

impl clap::builder::TypedValueParser for LabelParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let refuse = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("--label: {why}\n"),
            )
            .with_cmd(cmd)
        };
        let s = value
            .to_str()
            .ok_or_else(|| refuse("a label is text (UTF-8)".into()))?;
        label_problem(s).map_or(Ok(s.to_string()), |why| Err(refuse(why)))
    }
}

/// Why `s` is no label (see [`LabelParser`]), if it is not.
fn label_problem(s: &str) -> Option<String> {
    if s.trim().is_empty() {
        return Some("a label is some text, not empty".into());
    }
    if s.trim() != s {
        return Some("a label has no space at its start or end".into());
    }
    if let Some(c) = s
        .chars()
        .find(|&c| c.is_control() || crate::output::hidden(c))
    {
        return Some(format!(
            "a label is one line of text that shows as it is; this one holds {}",
            crate::output::escape(&c.to_string())
        ));
    }
    let n = s.chars().count();
    (n > LABEL_MAX).then(|| format!("a label is at most {LABEL_MAX} characters; this one has {n}"))
}

/// The longest `--label`, in characters (a git describe with a branch name fits many times).
pub const LABEL_MAX: usize = 200;

/// The clap definition of flip, with the generated parts of its help (the exit codes): the one
/// definition behind parsing, `flip completions` and `flip man`.
pub fn command() -> clap::Command {
    Cli::command().after_help(format!(
        "Targets: a local directory (/srv/app), [user@]host:/path or ssh://[user@]host[:port]/path; or ENV, every target of environment ENV of flip.toml.\n{}",
        crate::exit::Code::help_line()
    ))
}

/// Parses `args` (the program name first) with [`command`].
pub fn parse(args: &[OsString]) -> Result<Cli, clap::Error> {
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(args)?;
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// `flip completions SHELL`: the completion script on stdout.
pub fn completions(shell: Shell, out: &mut dyn std::io::Write) {
    // Without the hidden commands (the agent, blake3): clap_complete would offer them.
    let full = command();
    let mut cmd = clap::Command::new("flip")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    match shell {
        Shell::Bash => clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "flip", out),
        Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "flip", out),
        Shell::Fish => clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, "flip", out),
    }
}

/// `flip man`: the manual page (roff) of flip and its visible commands, one page: each
/// command's synopsis, description and options under COMMANDS (clap_mangen alone would refer
/// to pages flip-deploy(1), ... that nobody installs).
pub fn man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut cmd = command();
    cmd.build();
    let page = clap_mangen::Man::new(cmd.clone());
    page.render_title(out)?;
    page.render_name_section(out)?;
    page.render_synopsis_section(out)?;
    page.render_description_section(out)?;
    page.render_options_section(out)?;
    writeln!(out, ".SH COMMANDS")?;
    for sub in cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set() && c.get_name() != "help")
    {
        let name = sub.get_bin_name().unwrap_or(sub.get_name());
        writeln!(out, ".SS \"{name}\"")?;
        let sub_page = clap_mangen::Man::new(sub.clone());
        let mut body = Vec::new();
        sub_page.render_synopsis_section(&mut body)?;
        sub_page.render_description_section(&mut body)?;
        sub_page.render_options_section(&mut body)?;
        // The command's own sections become paragraphs of its subsection.
        for line in String::from_utf8_lossy(&body).lines() {
            match line.strip_prefix(".SH ") {
                Some(title) => {
                    let title = title.trim_matches('"');
                    let mut t = title.to_lowercase();
                    t[..1].make_ascii_uppercase();
                    writeln!(out, ".PP\n\\fI{t}\\fR\n.br")?
                }
                None => writeln!(out, "{line}")?,
            }
        }
    }
    page.render_extra_section(out)?;
    page.render_version_section(out)
}

#[cfg(test)]
mod tests {
    /// Every argument and flag of every command, hidden ones too, says what it is for.
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = super::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "flip", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn the_definition_is_consistent() {
        super::command().debug_assert();
    }

    /// `flip --version` (clap's) says what `flip-agent --version` says: the launcher on a
    /// server runs either only if it prints exactly `flip VERSION`.
    #[test]
    fn the_version_line_is_the_agents() {
        assert_eq!(
            super::command().render_version(),
            format!("{}\n", crate::agent_cmd::VERSION_LINE)
        );
    }

    /// The client puts no more of its first batch in the command line than the agent takes.
    #[test]
    fn the_clients_preamble_fits_the_agents() {
        const { assert!(flip_transport::ssh::PREAMBLE_MAX <= flip_agent::PREAMBLE_MAX) };
        // The most the client sends, in its words: read back whole.
        let most: Vec<u8> = (0..flip_transport::ssh::PREAMBLE_MAX)
            .map(|i| (i % 251) as u8)
            .collect();
        let words = flip_transport::ssh::preamble_words(&most);
        let texts = words.iter().map(|w| w.strip_prefix("--preamble=").unwrap());
        assert_eq!(crate::agent_cmd::preamble(texts), Ok(most.clone()));
        // A byte more is refused.
        let mut over = words.clone();
        over.push("--preamble=AA==".into());
        let texts = over.iter().map(|w| w.strip_prefix("--preamble=").unwrap());
        assert!(crate::agent_cmd::preamble(texts).is_err());
    }

    /// `flip agent` and `flip-agent agent` wait the same time for a silent client by default.
    #[test]
    fn the_agents_default_idle_timeout_is_the_librarys() {
        let m = super::command()
            .try_get_matches_from(["flip", "agent", "--root", "/srv"])
            .unwrap();
        let (_, agent) = m.subcommand().unwrap();
        assert_eq!(
            agent.get_one::<u64>("idle_timeout"),
            Some(&crate::agent_cmd::DEFAULT_IDLE_SECS)
        );
        assert_eq!(crate::agent_cmd::DEFAULT_IDLE_SECS, 600);
    }
}
