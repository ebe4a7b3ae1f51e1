//! Client commands: accounts, transfers, lookups, history. Output is JSON in
//! the REST API's shapes, so it can be piped to `jq`.

use anyhow::{bail, Context, Result};
use cellpay_api::json::{AccountsJson, BalancesJson, CreateResultsJson, TransfersJson};
use cellpay_ledger::{
    id, Account, AccountFilter, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags,
};

use crate::client::Client;

#[derive(clap::Args)]
pub struct Connection {
    /// The server's address.
    #[arg(long, global = true, default_value = "127.0.0.1:7300", env = "CELLPAY_ADDRESS")]
    pub address: String,
}

#[derive(clap::Args)]
pub struct AccountArgs {
    #[command(subcommand)]
    pub command: AccountCommand,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(clap::Subcommand)]
pub enum AccountCommand {
    /// Create one account. Give `--id`, or `--user` (and `--index`) to mint the id from its owner.
    Create {
        #[arg(long, conflicts_with_all = ["user", "index"])]
        id: Option<u128>,
        /// The owning user; the account's shard is derived from it.
        #[arg(long)]
        user: Option<u64>,
        /// The account's index within its user.
        #[arg(long, default_value_t = 1)]
        index: u64,
        /// The ledger (currency or asset).
        #[arg(long)]
        ledger: u32,
        #[arg(long)]
        code: u16,
        /// Comma-separated: debits_must_not_exceed_credits, credits_must_not_exceed_debits, history, linked.
        #[arg(long, value_delimiter = ',')]
        flags: Vec<String>,
        #[arg(long, default_value_t = 0)]
        user_data_128: u128,
        #[arg(long, default_value_t = 0)]
        user_data_64: u64,
        #[arg(long, default_value_t = 0)]
        user_data_32: u32,
    },
}

#[derive(clap::Args)]
pub struct TransferArgs {
    /// The transfer's id: the idempotency key (retrying with the same id never applies twice).
    #[arg(long)]
    pub id: u128,
    #[arg(long, required_unless_present_any = ["post", "void"])]
    pub debit: Option<u128>,
    #[arg(long, required_unless_present_any = ["post", "void"])]
    pub credit: Option<u128>,
    /// For a post: the amount to post (0 or absent: the whole pending amount).
    #[arg(long, default_value_t = 0)]
    pub amount: u128,
    #[arg(long, default_value_t = 0)]
    pub ledger: u32,
    #[arg(long, default_value_t = 0)]
    pub code: u16,
    /// Reserve the amount as pending (post or void it later).
    #[arg(long, conflicts_with_all = ["post", "void"])]
    pub pending: bool,
    /// For a pending transfer: seconds until it expires.
    #[arg(long, default_value_t = 0, requires = "pending")]
    pub timeout_s: u32,
    /// Post the pending transfer with this id.
    #[arg(long, value_name = "PENDING_ID", conflicts_with = "void")]
    pub post: Option<u128>,
    /// Void the pending transfer with this id.
    #[arg(long, value_name = "PENDING_ID")]
    pub void: Option<u128>,
    /// More flags, comma-separated: balancing_debit, balancing_credit, closing_debit, closing_credit.
    #[arg(long, value_delimiter = ',')]
    pub flags: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub user_data_128: u128,
    #[arg(long, default_value_t = 0)]
    pub user_data_64: u64,
    #[arg(long, default_value_t = 0)]
    pub user_data_32: u32,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(clap::Args)]
pub struct LookupArgs {
    #[command(subcommand)]
    pub what: LookupWhat,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(clap::Subcommand)]
pub enum LookupWhat {
    /// Accounts by id.
    Account { ids: Vec<u128> },
    /// Transfers by id.
    Transfer { ids: Vec<u128> },
}

#[derive(clap::Args)]
pub struct HistoryArgs {
    /// The account.
    pub account: u128,
    /// Show the balance after each transfer instead (accounts flagged `history`).
    #[arg(long)]
    pub balances: bool,
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Newest first.
    #[arg(long)]
    pub reversed: bool,
    /// Only transfers debiting the account.
    #[arg(long, conflicts_with = "credits_only")]
    pub debits_only: bool,
    /// Only transfers crediting the account.
    #[arg(long)]
    pub credits_only: bool,
    /// Inclusive lower timestamp bound, ns (for pagination: last seen + 1).
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Inclusive upper timestamp bound, ns.
    #[arg(long, default_value_t = 0)]
    pub to: u64,
    #[arg(long, default_value_t = 0)]
    pub code: u16,
    #[command(flatten)]
    pub connection: Connection,
}

fn parse_flags<F: Copy + std::ops::BitOr<Output = F> + Default>(
    names: &[String],
    from_name: impl Fn(&str) -> Option<F>,
) -> Result<F> {
    let mut flags = F::default();
    for name in names.iter().filter(|n| !n.is_empty()) {
        let Some(flag) = from_name(name) else { bail!("unknown flag {name:?}") };
        flags = flags | flag;
    }
    Ok(flags)
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn account(args: AccountArgs) -> Result<()> {
    let AccountCommand::Create { id, user, index, ledger, code, flags, user_data_128, user_data_64, user_data_32 } =
        args.command;
    let id = match (id, user) {
        (Some(id), _) => id,
        (None, Some(user)) => id::account_id(user, index).context("that user and index mint a reserved id")?,
        (None, None) => bail!("give --id, or --user (and --index)"),
    };
    let flags = parse_flags(&flags, AccountFlags::from_name)?;
    let account = Account { id, ledger, code, flags, user_data_128, user_data_64, user_data_32, ..Account::default() };
    let mut client = Client::connect(&args.connection.address).await?;
    let results = client.create_accounts(&[account]).await?;
    print_json(&CreateResultsJson::from_account_results(&results))?;
    match results[0] {
        CreateAccountResult::Ok | CreateAccountResult::Exists => Ok(()),
        other => bail!("account {id} was not created: {other}"),
    }
}

pub async fn transfer(args: TransferArgs) -> Result<()> {
    let mut flags = parse_flags(&args.flags, TransferFlags::from_name)?;
    let mut pending_id = 0;
    if args.pending {
        flags.insert(TransferFlags::PENDING);
    }
    if let Some(id) = args.post {
        flags.insert(TransferFlags::POST_PENDING_TRANSFER);
        pending_id = id;
    }
    if let Some(id) = args.void {
        flags.insert(TransferFlags::VOID_PENDING_TRANSFER);
        pending_id = id;
    }
    let transfer = Transfer {
        id: args.id,
        debit_account_id: args.debit.unwrap_or(0),
        credit_account_id: args.credit.unwrap_or(0),
        amount: args.amount,
        pending_id,
        user_data_128: args.user_data_128,
        user_data_64: args.user_data_64,
        user_data_32: args.user_data_32,
        timeout_s: args.timeout_s,
        ledger: args.ledger,
        code: args.code,
        flags,
        timestamp: 0,
    };
    let mut client = Client::connect(&args.connection.address).await?;
    let results = client.create_transfers(&[transfer]).await?;
    print_json(&CreateResultsJson::from_transfer_results(&results))?;
    match results[0] {
        CreateTransferResult::Ok | CreateTransferResult::Exists => Ok(()),
        other => bail!("transfer {} was not applied: {other}", args.id),
    }
}

pub async fn lookup(args: LookupArgs) -> Result<()> {
    let mut client = Client::connect(&args.connection.address).await?;
    match args.what {
        LookupWhat::Account { ids } => {
            if ids.is_empty() {
                bail!("give at least one account id");
            }
            print_json(&AccountsJson::from_ledger(&client.lookup_accounts(&ids).await?))
        }
        LookupWhat::Transfer { ids } => {
            if ids.is_empty() {
                bail!("give at least one transfer id");
            }
            print_json(&TransfersJson::from_ledger(&client.lookup_transfers(&ids).await?))
        }
    }
}

pub async fn history(args: HistoryArgs) -> Result<()> {
    let filter = AccountFilter {
        account_id: args.account,
        timestamp_min: args.from,
        timestamp_max: args.to,
        limit: args.limit,
        code: args.code,
        debits: !args.credits_only,
        credits: !args.debits_only,
        reversed: args.reversed,
        ..AccountFilter::default()
    };
    filter.validate().map_err(|error| anyhow::anyhow!("{error}"))?;
    let mut client = Client::connect(&args.connection.address).await?;
    if args.balances {
        print_json(&BalancesJson::from_ledger(&client.get_account_balances(&filter).await?))
    } else {
        print_json(&TransfersJson::from_ledger(&client.get_account_transfers(&filter).await?))
    }
}
