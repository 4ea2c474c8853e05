DROP TABLE deposits;
DROP TABLE payments;
DROP TABLE accounts;
