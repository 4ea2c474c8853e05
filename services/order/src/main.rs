use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = shop_order::Config::parse();
    let telemetry =
        shop_service::Telemetry::init(shop_order::SERVICE.name, config.service.log_format)?;
    if config.service.migrate_only {
        let result = shop_service::migrate_only(&config.service, shop_order::MIGRATIONS).await;
        telemetry.shutdown().await;
        return result;
    }
    let shutdown = shop_service::shutdown_on_signal();
    let result = async { shop_order::build(config).await?.run(shutdown).await }.await;
    // The last spans leave before the process does.
    telemetry.shutdown().await;
    result
}
