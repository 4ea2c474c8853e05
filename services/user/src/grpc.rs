//! The gRPC adapter: requests in, domain calls, responses out.

use shop_proto::user::v1 as pb;
use shop_proto::user::v1::user_service_server::{UserService, UserServiceServer};
use shop_service::{caller_of, page_after, page_size, parse_uuid, timestamp};
use tonic::{Request, Response, Status};

use crate::app::Users;
use crate::store::User;

pub(crate) struct UserApi {
    users: Users,
}

impl UserApi {
    pub(crate) fn new(users: Users) -> Self {
        Self { users }
    }

    pub(crate) fn into_server(self) -> UserServiceServer<Self> {
        UserServiceServer::new(self)
            .max_decoding_message_size(shop_service::limits::MAX_REQUEST_BYTES)
    }
}

impl From<User> for pb::User {
    fn from(user: User) -> Self {
        Self {
            user_id: user.user_id.to_string(),
            email: user.email,
            name: user.name,
            created_at: Some(timestamp(user.created_at)),
        }
    }
}

#[tonic::async_trait]
impl UserService for UserApi {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let user = self
            .users
            .create_user(&caller, &request.email, &request.name)
            .await?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let user_id = parse_uuid("user_id", &request.get_ref().user_id)?;
        let user = self.users.get_user(&caller, user_id).await?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let after = page_after(&request.page_token)?;
        let users = self.users.list_users(&caller, after, limit).await?;
        let next_page_token = if users.len() as i64 == limit {
            users
                .last()
                .map(|u| u.user_id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListUsersResponse {
            users: users.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }
}
