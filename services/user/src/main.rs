use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = shop_user::Config::parse();
    let telemetry =
        shop_service::Telemetry::init(shop_user::SERVICE.name, config.service.log_format)?;
    if config.service.migrate_only {
        let result = shop_service::migrate_only(&config.service, shop_user::MIGRATIONS).await;
        telemetry.shutdown().await;
        return result;
    }
    let shutdown = shop_service::shutdown_on_signal();
    let result = async { shop_user::build(config).await?.run(shutdown).await }.await;
    // The last spans leave before the process does.
    telemetry.shutdown().await;
    result
}
