//! Deletes the queues named on standard input, one per line, from the
//! broker at `AMQP_URL`. `.ci/run` feeds it the `test-*` queues an
//! interrupted earlier run left behind: `rabbitmqctl delete_queue` starts an
//! Erlang node per queue, which takes minutes for a few hundred.

use flotilla_common::{Broker, DEFAULT_AMQP_URL};
use lapin::options::QueueDeleteOptions;
use std::io::BufRead;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    flotilla_common::ensure_crypto_provider();
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned());
    let broker = Broker::new(&url, "delete-queues")?;
    let connection = broker.connection().await?;
    let channel = connection.create_channel().await?;
    let mut deleted = 0;
    for name in std::io::stdin().lock().lines() {
        let name = name?;
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await
            .map_err(|e| format!("deleting queue {name}: {e}"))?;
        deleted += 1;
    }
    println!("deleted {deleted} queues");
    Ok(())
}
