//! Every request gets a `request` span with its method, path, status and
//! event count, on both APIs.

mod front_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cellpay_api::proto;
use front_support::{accounts_json, Server};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

type Fields = BTreeMap<String, String>;

/// Keeps the fields of every `request` span, in the order the spans were created.
#[derive(Clone, Default)]
struct RequestSpans(Arc<Mutex<Vec<Fields>>>);

struct FieldVisitor<'a>(&'a mut Fields);

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

struct Index(usize);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for RequestSpans {
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        if attributes.metadata().name() != "request" {
            return;
        }
        let mut fields = Fields::new();
        attributes.record(&mut FieldVisitor(&mut fields));
        let mut spans = self.0.lock().unwrap();
        spans.push(fields);
        context.span(id).unwrap().extensions_mut().insert(Index(spans.len() - 1));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        let span = context.span(id).unwrap();
        let index = span.extensions().get::<Index>().map(|Index(index)| *index);
        if let Some(index) = index {
            values.record(&mut FieldVisitor(&mut self.0.lock().unwrap()[index]));
        }
    }
}

fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_traced_with_method_path_status_and_events() {
    let spans = RequestSpans::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone())).unwrap();
    let server = Server::start().await;

    server.post_ok("/v1/accounts", &accounts_json()).await;
    server.post("/v1/transfers", "not json").await;
    let mut grpc = server.grpc().await;
    grpc.lookup_accounts(proto::LookupAccountsRequest::from_ledger(&[1, 2])).await.unwrap();
    grpc.lookup_accounts(proto::LookupAccountsRequest { ids: vec![] }).await.unwrap_err();

    let recorded = spans.0.lock().unwrap().clone();
    // A failed gRPC call's status is in its headers; a successful one's is in
    // the trailers, after the span has closed.
    let expected = [
        fields(&[("method", "POST"), ("path", "/v1/accounts"), ("status", "200"), ("events", "3")]),
        fields(&[("method", "POST"), ("path", "/v1/transfers"), ("status", "400")]),
        fields(&[
            ("method", "POST"),
            ("path", "/cellpay.v1.Ledger/LookupAccounts"),
            ("status", "200"),
            ("events", "2"),
        ]),
        fields(&[
            ("method", "POST"),
            ("path", "/cellpay.v1.Ledger/LookupAccounts"),
            ("status", "200"),
            ("grpc_status", "3"),
        ]),
    ];
    assert_eq!(recorded, expected);
    drop(grpc);
    server.stop().await;
}
