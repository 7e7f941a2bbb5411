//! The payments processor from DESIGN.md: records payments for completed and
//! cancelled orders.
//!
//! Built twice: the default build (v2) is idempotent, while the `v1` feature
//! keeps the classic bug of charging a re-delivered `order_completed` again.

use std::borrow::Cow;

use rewind_guest::{Error, Event, Processor, Result, emit_json, now_ms, random_hex, sql};
use serde::{Deserialize, Serialize};

struct Payments;

/// An `orders` payload. Read flat, with `type` a field, rather than as a
/// `#[serde(tag = "type")]` enum: serde decodes such an enum by copying the
/// whole object into a buffer first, which for payloads this small costs
/// about as much as the decoding.
#[derive(Deserialize)]
struct Order<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    order_id: String,
    customer_id: Option<String>,
    amount_cents: Option<i64>,
    currency: Option<String>,
}

/// The `payment_processed` state event: the full payment row.
#[derive(Serialize)]
struct Payment {
    order_id: String,
    customer_id: String,
    amount_cents: i64,
    currency: String,
    status: &'static str,
    gateway_ref: String,
    updated_at_ms: i64,
}

impl Processor for Payments {
    fn init() -> Result<()> {
        // Text keys and small rows: WITHOUT ROWID keeps each table in one
        // B-tree instead of a table plus an index on the key.
        // Version 3 adds a column: a schema change for the replay tests.
        let extra = if cfg!(feature = "v3") {
            ", channel TEXT NOT NULL DEFAULT 'web'"
        } else {
            ""
        };
        sql::execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS payments (
                    order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL,
                    amount_cents INTEGER NOT NULL, currency TEXT NOT NULL, status TEXT NOT NULL,
                    gateway_ref TEXT NOT NULL, updated_at_ms INTEGER NOT NULL{extra})
                 WITHOUT ROWID"
            ),
            &[],
        )?;
        sql::execute(
            "CREATE TABLE IF NOT EXISTS customer_totals (
                customer_id TEXT PRIMARY KEY, charged_cents INTEGER NOT NULL,
                refunded_cents INTEGER NOT NULL, charges INTEGER NOT NULL)
             WITHOUT ROWID",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: Event) -> Result<()> {
        let order: Order = event.json()?;
        match &*order.kind {
            "order_completed" => {
                let (Some(customer_id), Some(amount_cents), Some(currency)) =
                    (order.customer_id, order.amount_cents, order.currency)
                else {
                    return Err(Error::invalid(
                        "order_completed needs customer_id, amount_cents and currency",
                    ));
                };
                let payment = Payment {
                    order_id: order.order_id,
                    customer_id,
                    amount_cents,
                    currency,
                    status: "charged",
                    // `concat`, not `format!`: in the sandbox the formatting
                    // machinery costs more than the rest of building the row.
                    gateway_ref: ["gw_", &random_hex(8)].concat(),
                    updated_at_ms: now_ms(),
                };
                // Version 1 overwrites the payment of a re-delivered order and
                // charges again; version 2 keeps the first and stops.
                let insert = if cfg!(feature = "v1") {
                    "INSERT OR REPLACE INTO payments (order_id, customer_id, amount_cents, currency,
                        status, gateway_ref, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                } else {
                    "INSERT INTO payments (order_id, customer_id, amount_cents, currency,
                        status, gateway_ref, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (order_id) DO NOTHING"
                };
                let inserted = sql::execute(
                    insert,
                    &[
                        &payment.order_id,
                        &payment.customer_id,
                        &payment.amount_cents,
                        &payment.currency,
                        &payment.status,
                        &payment.gateway_ref,
                        &payment.updated_at_ms,
                    ],
                )?;
                if inserted == 0 {
                    // A re-delivered order: already charged (or refunded), nothing to do.
                    return Ok(());
                }
                sql::execute(
                    "INSERT INTO customer_totals VALUES (?1, ?2, 0, 1)
                     ON CONFLICT (customer_id) DO UPDATE SET
                        charged_cents = charged_cents + excluded.charged_cents,
                        charges = charges + 1",
                    &[&payment.customer_id, &payment.amount_cents],
                )?;
                emit_json("payments", &payment.order_id, &payment)
            }
            "order_cancelled" => {
                let order_id = order.order_id;
                let row = sql::query_row(
                    "SELECT customer_id, amount_cents, currency, gateway_ref, status
                     FROM payments WHERE order_id = ?1",
                    &[&order_id],
                )?
                .ok_or_else(|| Error::invalid(format!("cancel of unknown order {order_id}")))?;
                if row.get::<String>("status")? != "charged" {
                    return Err(Error::invalid(format!(
                        "order {order_id} is already refunded"
                    )));
                }
                let payment = Payment {
                    order_id,
                    customer_id: row.get("customer_id")?,
                    amount_cents: row.get("amount_cents")?,
                    currency: row.get("currency")?,
                    status: "refunded",
                    gateway_ref: row.get("gateway_ref")?,
                    updated_at_ms: now_ms(),
                };
                sql::execute(
                    "UPDATE payments SET status = 'refunded', updated_at_ms = ?2 WHERE order_id = ?1",
                    &[&payment.order_id, &payment.updated_at_ms],
                )?;
                sql::execute(
                    "UPDATE customer_totals SET refunded_cents = refunded_cents + ?2
                     WHERE customer_id = ?1",
                    &[&payment.customer_id, &payment.amount_cents],
                )?;
                emit_json("payments", &payment.order_id, &payment)
            }
            other => Err(Error::invalid(format!("unknown order type {other:?}"))),
        }
    }
}

rewind_guest::export!(Payments);
