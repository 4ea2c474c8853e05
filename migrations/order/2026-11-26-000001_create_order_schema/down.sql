DROP TABLE order_steps;
DROP TABLE order_items;
DROP TABLE orders;
DROP TABLE known_users;
