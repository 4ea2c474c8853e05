use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = shop_order::Config::parse();
    shop_service::init_logs(config.service.log_format);
    let shutdown = shop_service::shutdown_on_signal();
    shop_order::build(config).await?.run(shutdown).await
}
