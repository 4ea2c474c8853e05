//! The gRPC adapter.

use shop_proto::payment::v1 as pb;
use shop_proto::payment::v1::payment_service_server::{PaymentService, PaymentServiceServer};
use shop_service::{ApiError, caller_of, parse_uuid};
use tonic::{Request, Response, Status};

use crate::app::{Payment, Wallets};
use crate::domain::PaymentStatus;

pub(crate) struct PaymentApi {
    wallets: Wallets,
}

impl PaymentApi {
    pub(crate) fn new(wallets: Wallets) -> Self {
        Self { wallets }
    }

    pub(crate) fn into_server(self) -> PaymentServiceServer<Self> {
        PaymentServiceServer::new(self)
            .max_decoding_message_size(shop_service::limits::MAX_REQUEST_BYTES)
    }
}

/// A tombstone has no place in the API (`Wallets::payment` answers
/// NOT_FOUND for one); meeting one here is a bug, said so.
impl TryFrom<Payment> for pb::Payment {
    type Error = ApiError;

    fn try_from(payment: Payment) -> Result<Self, ApiError> {
        let status = match payment.status {
            PaymentStatus::Captured => pb::PaymentStatus::Captured,
            PaymentStatus::Declined => pb::PaymentStatus::Declined,
            PaymentStatus::Refunded => pb::PaymentStatus::Refunded,
            PaymentStatus::Pending => pb::PaymentStatus::Pending,
            PaymentStatus::Refunding => pb::PaymentStatus::Refunding,
            PaymentStatus::Cancelled => {
                return Err(ApiError::Internal(format!(
                    "the tombstone of order {} reached the API",
                    payment.order_id
                )));
            }
        };
        Ok(Self {
            order_id: payment.order_id.to_string(),
            user_id: payment.user_id.to_string(),
            amount_cents: payment.amount_cents,
            status: status.into(),
            reason: payment.reason,
        })
    }
}

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        let caller = caller_of(&request)?;
        let user_id = parse_uuid("user_id", &request.get_ref().user_id)?;
        let balance_cents = self.wallets.balance(&caller, user_id).await?;
        Ok(Response::new(pb::GetAccountResponse {
            account: Some(pb::Account {
                user_id: user_id.to_string(),
                balance_cents,
            }),
        }))
    }

    async fn deposit(
        &self,
        request: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        let caller = caller_of(&request)?;
        let r = request.into_inner();
        let user_id = parse_uuid("user_id", &r.user_id)?;
        let balance_cents = self
            .wallets
            .deposit(&caller, user_id, r.amount_cents, &r.idempotency_key)
            .await?;
        Ok(Response::new(pb::DepositResponse {
            account: Some(pb::Account {
                user_id: user_id.to_string(),
                balance_cents,
            }),
        }))
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::GetPaymentResponse>, Status> {
        let caller = caller_of(&request)?;
        let order_id = parse_uuid("order_id", &request.get_ref().order_id)?;
        let payment = self.wallets.payment(&caller, order_id).await?;
        Ok(Response::new(pb::GetPaymentResponse {
            payment: Some(payment.try_into()?),
        }))
    }
}
