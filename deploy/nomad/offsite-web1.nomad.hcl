# Offsite as a Nomad periodic batch job: the site web1 twice a day.
#   nomad job run offsite-web1.nomad.hcl
job "offsite-web1" {
  type = "batch"

  periodic {
    crons            = ["34 3,20 * * *"]
    time_zone        = "Europe/Berlin"
    # Never two runs of a site at once (offsite's lock would refuse the
    # second with exit 4 anyway).
    prohibit_overlap = true
  }

  group "backup" {
    # A failed backup is reported, not retried blindly.
    restart {
      attempts = 0
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "offsite" {
      driver = "podman"

      config {
        image = "registry.example.org/offsite:0.1.0"
        # The task's local/ directory is /local in the container.
        args  = ["run", "--site", "/local/offsite/web1.toml"]
        volumes = [
          "/srv/offsite/web1:/srv/offsite/web1",
          "/var/www:/srv/www:ro",
        ]
      }

      # The site file, rendered into the task's local/ directory.
      template {
        destination = "local/offsite/web1.toml"
        data        = <<-SITE
          store = "/srv/offsite/web1"
          script = "arc"
          [read]
          roots = ["/srv/www"]
          [params]
          path = "/srv/www"
        SITE
      }

      # A site that reaches hosts over SSH names its key as
      # `identity = "/secrets/id_ed25519"` in [hosts.NAME], rendered from
      # Nomad variables with perms = "400" (offsite refuses keys others can
      # read), and its known_hosts the same way.

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
