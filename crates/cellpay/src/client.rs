//! A gRPC client of a cellpay node, speaking ledger types.

use anyhow::{anyhow, Context, Result};
use cellpay_api::proto;
use cellpay_api::proto::ledger_client::LedgerClient;
use cellpay_ledger::{Account, AccountBalance, AccountFilter, CreateAccountResult, CreateTransferResult, Transfer};
use tonic::transport::Channel;

#[derive(Clone)]
pub struct Client {
    inner: LedgerClient<Channel>,
}

impl Client {
    /// Connects to `address` (`host:port` or `http://host:port`).
    pub async fn connect(address: &str) -> Result<Client> {
        let url = if address.starts_with("http://") { address.to_string() } else { format!("http://{address}") };
        let channel = Channel::from_shared(url.clone())
            .with_context(|| format!("bad server address {address:?}"))?
            .connect()
            .await
            .with_context(|| format!("cannot connect to the cellpay server at {url}"))?;
        let inner = LedgerClient::new(channel)
            .max_decoding_message_size(proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(proto::MESSAGE_BYTES_MAX);
        Ok(Client { inner })
    }

    pub async fn create_accounts(&mut self, accounts: &[Account]) -> Result<Vec<CreateAccountResult>> {
        let request = proto::CreateAccountsRequest::from_ledger(accounts);
        let reply = self.inner.create_accounts(request).await.map_err(status)?.into_inner();
        Ok(reply.to_ledger()?)
    }

    pub async fn create_transfers(&mut self, transfers: &[Transfer]) -> Result<Vec<CreateTransferResult>> {
        let request = proto::CreateTransfersRequest::from_ledger(transfers);
        let reply = self.inner.create_transfers(request).await.map_err(status)?.into_inner();
        Ok(reply.to_ledger()?)
    }

    pub async fn lookup_accounts(&mut self, ids: &[u128]) -> Result<Vec<Account>> {
        let request = proto::LookupAccountsRequest::from_ledger(ids);
        let reply = self.inner.lookup_accounts(request).await.map_err(status)?.into_inner();
        Ok(reply.to_ledger()?)
    }

    pub async fn lookup_transfers(&mut self, ids: &[u128]) -> Result<Vec<Transfer>> {
        let request = proto::LookupTransfersRequest::from_ledger(ids);
        let reply = self.inner.lookup_transfers(request).await.map_err(status)?.into_inner();
        Ok(reply.to_ledger()?)
    }

    pub async fn get_account_transfers(&mut self, filter: &AccountFilter) -> Result<Vec<Transfer>> {
        let request = proto::GetAccountTransfersRequest::from_ledger(filter);
        let reply = self.inner.get_account_transfers(request).await.map_err(status)?.into_inner();
        Ok(reply.to_ledger()?)
    }

    pub async fn get_account_balances(&mut self, filter: &AccountFilter) -> Result<Vec<AccountBalance>> {
        let request = proto::GetAccountBalancesRequest::from_ledger(filter);
        let reply = self.inner.get_account_balances(request).await.map_err(status)?.into_inner();
        Ok(reply.to_ledger()?)
    }

    /// Looks up any number of accounts, `BATCH_EVENTS_MAX` at a time.
    pub async fn lookup_accounts_all(&mut self, ids: &[u128]) -> Result<Vec<Account>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(cellpay_ledger::BATCH_EVENTS_MAX) {
            out.extend(self.lookup_accounts(chunk).await?);
        }
        Ok(out)
    }
}

fn status(status: tonic::Status) -> anyhow::Error {
    anyhow!("server refused the request: {} ({:?})", status.message(), status.code())
}
